"""Checks of the paths a command will write, made before it does any work.

A folder or file the user names as output must not be a file where a folder is needed (or the
other way round), must not lie below a file, and must be in a folder this process may write
(read-only file systems included). Each check raises :class:`~sparse_transformer.errors.UserError`
with one line naming the option, the path and the fix; a full disk is found only when writing (the
command line turns that OSError into one line too).

:func:`atomic_output` is how every file the package writes whole (checkpoints, configs, exported
weights, samples, plots, prepared data's meta.json) gets its name only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError
from .runfolder import temporary_name


def _writable_parent(path: Path, option: str, shown: Path | None = None) -> None:
    """The nearest existing folder above (or at) ``path`` is a folder this process may write in
    (``shown``: the path the message names, default ``path``)."""
    here, path = path, shown or path
    while not here.exists():
        if here.parent == here:
            return
        here = here.parent
    if not here.is_dir():
        raise UserError(f"{option} {path}: {here} is a file, not a folder; choose another path")
    if not os.access(here, os.W_OK | os.X_OK):
        raise UserError(
            f"{option} {path}: cannot write in {here} (permission denied or a read-only file system); "
            "choose a writable path"
        )


def check_output_dir(path: str | Path, option: str) -> Path:
    """``path`` can be used (or created) as an output folder. Returns it as a Path.

    Raises:
        UserError: it is a file, lies below a file, or is in a folder that cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; pass a folder (it is created when missing)")
    _writable_parent(path, option)
    return path


def check_run_dir(path: str | Path, option: str) -> Path:
    """``path`` names a run folder to read: refused with one line when it is a file (a folder that
    does not exist is left to the loader, which says so). Returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; pass the run's folder (it holds config.json)")
    return path


def check_output_file(path: str | Path, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` can be written as a file: not a folder, not below a file, in a writable folder and,
    given ``suffixes`` (e.g. ``(".png",)``), ending in one of them (case-insensitive). Returns it as a Path.

    Raises:
        UserError: naming the problem and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{option} {path} is a folder; pass a file name, e.g. {path / ('out' + (suffixes or ('',))[0])}"
        )
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(
            f"{option} {path}: the file type {path.suffix or '(none)'} cannot be written; "
            f"end the name in {', '.join(suffixes[:6])}"
        )
    _writable_parent(path.parent, option, path)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where folders cannot be opened, e.g. on Windows, the
    rename is still atomic and this does nothing)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, fsync: bool = False):
    """Write a file all at once: yields a temporary path beside ``path``
    (:func:`~sparse_transformer.runfolder.temporary_name`: same suffix, so that writers that choose
    the format by it still can) and renames it to ``path`` when the block ends without error. With
    ``fsync``, the file is flushed to disk before the rename and the folder after it, so that the
    new file survives a power cut (checkpoints, configs and exported weights ask for this).

    On any error the temporary file is removed and whatever was at ``path`` stays as it was; an
    OSError (a full disk) is raised again naming ``path``. The rename replaces a symbolic link at
    ``path`` (or a leftover at the temporary name) instead of writing through it."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:  # fsync flushes the file, whichever descriptor asks
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync_dir(path.parent)
