"""The run folder as a place on disk: one writer at a time, paths kept inside it, logs that survive.

* :class:`RunLock`: ``train`` holds ``run_dir/.lock`` (``flock``, with the holder's PID written in it)
  for its whole life; a second ``train`` on the folder is refused with one line naming the folder and
  the PID. The kernel drops the lock when its process dies, however it dies, so a lock left by a
  killed run is taken over without asking; the file is removed when the holder ends. Under torchrun
  only rank 0 takes it.
* :func:`inside`: a path read from a run folder must stay in it once symlinks and ``..`` are
  resolved; a run folder someone sent cannot make the tool read files elsewhere.
* :func:`trim_log`: what a resume does to ``metrics.jsonl``, which is only ever appended to: the
  records written after the checkpoint it resumes from, and a last line cut short by a kill, are cut
  off the end by truncating the file at the start of the first such line (the lines before it are
  never rewritten).
* :func:`remove_temporary_files`: the ``.STEM.tmp-PID.SUFFIX`` files (:func:`temporary_name`) that
  atomic writes leave when killed before their rename, removed when ``train`` starts (it holds the
  lock, so no write is in flight).

Imports nothing of the package but :mod:`~sparse_transformer.errors`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import BAD_JSON, UserError

LOCK = ".lock"
# The names of temporary_name (.STEM.tmp-PID.SUFFIX), and .NAME.tmp-PID: what checkpoints of
# earlier versions were written under, still removed when found.
TEMPORARY = re.compile(r"\..+\.tmp-[0-9]+(\.[A-Za-z0-9]+)?")


def temporary_name(path: str | Path) -> Path:
    """The name an atomic write (:func:`~sparse_transformer.paths.atomic_output`) gives its file
    before the rename: ``.STEM.tmp-PID.SUFFIX`` beside ``path``: hidden, one per process, and with
    ``path``'s suffix, so that writers that choose the format by it still can. :data:`TEMPORARY`
    matches it, so :func:`remove_temporary_files` finds what a killed write left."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def inside(run_dir: str | Path, path: str | Path, what: str = "checkpoint") -> Path:
    """``path``, after checking that it lies inside ``run_dir`` once symlinks and ``..`` are resolved.

    The run folder itself may be reached through a symlink; what it contains may not point out of it.

    Raises:
        UserError: ``path`` resolves outside ``run_dir`` (``what`` names the command in the message).
    """
    try:
        root, real = Path(run_dir).resolve(), Path(path).resolve()
    except (RuntimeError, OSError):  # a symbolic link that leads to itself (Python 3.11: RuntimeError)
        raise UserError(
            f"{what}: refused {path}: it is a symbolic link that leads back to itself; remove the link"
        ) from None
    if real != root and root not in real.parents:
        raise UserError(
            f"{what}: refused {path}: it leads out of the run folder {run_dir} (to {real}); a run folder "
            "must hold its own files: copy them in, or use a run written by sparse-transformer train"
        )
    return Path(path)


class RunLock:
    """An exclusive lock on a run folder: ``acquire`` creates the folder if needed and takes
    ``.lock``; ``release`` removes the lock file (and the folder, if ``acquire`` created it and it is
    still empty), so a command refused before writing leaves the disk as it found it.

    POSIX ``flock``: the lock belongs to the open file and ends with the process. A process that finds
    the file locked reads the holder's PID from it; one that wins the lock on a file already unlinked
    by a departing holder notices (the path no longer names its file) and tries again.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []  # folders acquire made, innermost first

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX (Windows): no lock
            return self
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"train: cannot create the run folder {self.run_dir} ({e}); choose another --run-dir"
            ) from None
        self.created = missing
        if self.path.is_symlink():
            raise UserError(
                f"train: refused {self.path}: the lock file is a symbolic link (locking would write where it points); "
                "remove it"
            )
        while True:
            try:
                flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(self.path, flags, 0o644)  # never through a link: it could truncate a file elsewhere
            except OSError as e:
                self.release()
                raise UserError(
                    f"train: cannot write in the run folder {self.run_dir} ({e}); choose another --run-dir"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self.release()
                raise UserError(
                    f"train: {self.run_dir} is in use by another train process (PID {holder}); wait for it to "
                    f"end or stop it, or choose another --run-dir"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file on its way out: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still held: see the class docstring
            finally:
                os.close(self.fd)
                self.fd = None
        for folder in self.created:
            try:
                folder.rmdir()  # only if empty: a run that wrote anything keeps its folder
            except OSError:
                break
        self.created = []


def remove_temporary_files(run_dir: str | Path) -> list[str]:
    """Delete the leftover temporary files (:func:`temporary_name`) of interrupted atomic writes in
    ``run_dir`` (call with the lock held). Returns their names."""
    removed = []
    for path in sorted(Path(run_dir).iterdir()):
        if TEMPORARY.fullmatch(path.name) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def trim_log(path: str | Path, step: int) -> list[str]:
    """Make ``metrics.jsonl`` end where the checkpoint of ``step`` left it, before a resume appends.

    Cuts the file (``os.truncate``, one system call: a kill leaves it either cut or not) at the start
    of the first line that is either a record of a later step (written after the checkpoint by the
    interrupted run; the resumed run writes them again) or an incomplete last line (no newline: a kill
    mid-write). Lines before the cut are never rewritten; a damaged line in the middle is left alone.

    Returns:
        warnings to print: a line cut short, damaged lines left in place (records of later steps are
        dropped without one).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, as every complete record does
    notes, cut, start = [], len(data), 0
    if tail:
        cut = len(data) - len(tail)
        notes.append(f"warning: {path} line {len(lines) + 1} was cut short (a kill while writing it); dropped it")
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except BAD_JSON:
            notes.append(f"warning: {path} line {number} is not a JSON record; left as it is")
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            cut = start
            break
        start += len(line) + 1
    if cut < len(data):
        os.truncate(path, cut)
    return notes
