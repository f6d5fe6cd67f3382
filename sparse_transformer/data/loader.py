"""Read prepared data: flat uint8 ``train/val/test.bin`` files through numpy.memmap, nanoGPT style.

A prepared data directory (written by :func:`sparse_transformer.data.prepare.prepare`) holds
``meta.json`` and three flat byte files. Text and audio are one long byte stream per split; images
are records of ``record_len`` bytes (one image each, raster order, channel fastest), back to back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import BAD_JSON, UserError
from ..runfolder import temporary_name
from .format import FORMAT_VERSION, META_KEYS, SPLITS
from .prepare import KINDS, prepare

MODALITIES = ("text", "image", "audio")

# The embedded data set: a 6 MB slice of an English Wikipedia XML dump (see default/LICENSE.md).
DEFAULT_SOURCE = Path(__file__).with_name("default") / "enwiki-sample.xml.bz2"


def _prepare_hint(data_dir: Path, kind: str | None = None) -> str:
    return f"run `sparse-transformer prepare {kind or 'KIND'} --src PATH --out {data_dir}`"


def _count(x, low: int = 0) -> bool:
    """Whether ``x`` is an int (not a bool) of at least ``low``."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the fields of a meta.json (types, ranges, agreement), or None."""
    if not isinstance(meta["kind"], str):
        return f"kind = {meta['kind']!r} is not one of {', '.join(KINDS)}"
    if meta["modality"] not in MODALITIES:
        return f"modality = {meta['modality']!r} is not one of {', '.join(MODALITIES)}"
    splits = meta["splits"]
    if not isinstance(splits, dict) or not all(_count(splits.get(s)) for s in SPLITS):
        return f"splits = {splits!r} is not a byte count for each of {', '.join(SPLITS)}"
    record_len, shape, rate = meta["record_len"], meta["shape"], meta["sample_rate"]
    if record_len is not None and not _count(record_len, 1):
        return f"record_len = {record_len!r} is neither null nor a positive byte count"
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(_count(x, 1) for x in shape)):
        return f"shape = {shape!r} is neither null nor [height, width, channels]"
    if rate is not None and not _count(rate, 1):
        return f"sample_rate = {rate!r} is neither null nor a positive rate in Hz"
    if meta["modality"] == "image":
        if shape is None or record_len != shape[0] * shape[1] * shape[2]:
            return f"image data need a shape whose product is record_len (shape {shape!r}, record_len {record_len!r})"
    elif record_len is not None or shape is not None:
        return f"{meta['modality']} data have no record_len or shape (record_len {record_len!r}, shape {shape!r})"
    if meta["modality"] == "audio" and rate is None:
        return "audio data need a sample_rate"
    if not isinstance(meta["source"], str):
        return f"source = {meta['source']!r} is not text"
    return None


def read_meta(data_dir: str | Path) -> dict:
    """Load and check ``meta.json`` of a prepared data directory.

    Checks that meta.json and the three .bin files exist, that each file's size equals
    ``meta["splits"][split]`` (a mismatch means an interrupted or mixed-up prepare), that no split is
    empty, and that image splits hold whole records. Raises :class:`UserError` naming the fix.

    Returns:
        the meta dict (keys: kind, modality, record_len, shape, sample_rate, splits, source,
        format_version).
    """
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        raise UserError(f"data: {path} is missing; {_prepare_hint(data_dir)} first")
    try:
        meta = json.loads(path.read_text())
    except (*BAD_JSON, OSError) as e:
        raise UserError(f"data: {path} is unreadable ({e}); {_prepare_hint(data_dir)} again") from None
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise UserError(f"data: {path} lacks some of the keys {', '.join(META_KEYS)}; {_prepare_hint(data_dir)} again")
    hint = _prepare_hint(data_dir, meta["kind"] if meta["kind"] in KINDS else None)
    if meta["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"data: {path} has format_version {meta['format_version']!r}, this version reads {FORMAT_VERSION}; {hint} again"
        )
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"data: {path} is damaged: {problem}; {hint} again")
    record_len = meta["record_len"]
    for split in SPLITS:
        bin_path = data_dir / f"{split}.bin"
        if not bin_path.is_file():
            raise UserError(f"data: {bin_path} is missing; {hint} first")
        size, expected = bin_path.stat().st_size, meta["splits"].get(split)
        if size != expected:
            raise UserError(
                f"data: {bin_path} has {size} bytes but meta.json says {expected} (interrupted prepare?); {hint} again"
            )
        if size == 0:
            raise UserError(f"data: {bin_path} is empty; {hint} again with more data")
        if record_len and size % record_len:
            raise UserError(
                f"data: {bin_path} has {size} bytes, not a multiple of record_len {record_len}; {hint} again"
            )
    return meta


def open_split(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map one split read-only.

    Returns:
        uint8 memmap of shape [n_bytes] (for images: n_records * record_len bytes, back to back).
    """
    if split not in SPLITS:
        raise UserError(f"data: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    read_meta(data_dir)
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint8, mode="r")


def _check_record_len(seq_len: int, record_len: int | None) -> None:
    if seq_len <= 0:
        raise UserError(f"data: seq_len must be positive, got {seq_len}; set --data.seq_len")
    if record_len and record_len % seq_len:
        raise UserError(
            f"data: seq_len {seq_len} must equal the record length {record_len} of this image data or divide it; "
            f"set --data.seq_len {record_len}"
        )


def sample_batch(
    data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator, record_len: int | None = None
) -> torch.Tensor:
    """Draw ``batch_size`` random windows of ``seq_len`` bytes.

    Without ``record_len`` a window may start at any byte. With ``record_len`` (images), windows are
    aligned chunks: they start at multiples of ``seq_len``, which must divide ``record_len``, so a
    window never spans two images and, when ``seq_len == record_len``, is exactly one image. That is
    the same tiling :func:`eval_windows` scores, so training and evaluation see the same positions.

    Args:
        data: uint8 array [n_bytes] (e.g. from :func:`open_split`).
        rng: the caller's generator, so the data order is part of resumable state.
    Returns:
        int64 tensor [batch_size, seq_len] of byte values 0..255.
    """
    _check_record_len(seq_len, record_len)
    n = len(data)
    if n < seq_len:
        raise UserError(f"data: the split has {n} bytes, fewer than seq_len {seq_len}; use a smaller --data.seq_len")
    if record_len:
        starts = rng.integers(0, n // seq_len, size=batch_size) * seq_len
    else:
        starts = rng.integers(0, n - seq_len + 1, size=batch_size)
    x = np.stack([np.asarray(data[s : s + seq_len]) for s in starts])
    return torch.from_numpy(x.astype(np.int64))


def eval_windows(n_bytes: int, seq_len: int, record_len: int | None = None) -> list[tuple[int, int]]:
    """Tile a split into non-overlapping windows that score every byte exactly once.

    Windows are ``[0, seq_len), [seq_len, 2 seq_len), ...``; the last one is shorter when
    ``seq_len`` does not divide ``n_bytes``. Each window is evaluated on its own (no context carried
    over), which is the usual non-overlapping estimate; summing the windows' nats and dividing by
    ``n_bytes`` gives bits per byte. With ``record_len`` (images) ``seq_len`` must divide it, so every
    window is a whole image or an aligned part of one (the tiling :func:`sample_batch` trains on).

    Returns:
        list of (start, length) pairs in order; lengths sum to ``n_bytes``.
    """
    _check_record_len(seq_len, record_len)
    return [(s, min(seq_len, n_bytes - s)) for s in range(0, n_bytes, seq_len)]


def _cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparse-transformer"


def _is_valid(data_dir: Path) -> bool:
    try:
        return read_meta(data_dir)["kind"] == "text"
    except UserError:
        return False


def default_data_dir() -> Path:
    """The embedded Wikipedia sample, prepared (kind ``text``, 90/5/5 split) and cached.

    Lives in ``$XDG_CACHE_HOME/sparse-transformer/enwiki-sample`` (or ``~/.cache/...``). It is
    prepared on first use, and again whenever the cached copy is missing or fails
    :func:`read_meta`. Preparation happens in a private temporary directory that is renamed into
    place, so concurrent or interrupted runs never see a half-written copy.

    Returns:
        path of the prepared directory (5,480,771 / 304,487 / 304,488 bytes of train / val / test).
    """
    target = _cache_root() / "enwiki-sample"
    if _is_valid(target):
        return target
    tmp = temporary_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prepare("text", DEFAULT_SOURCE, tmp, progress=False)
        if not _is_valid(target):  # another process may have finished first; keep its copy then
            shutil.rmtree(target, ignore_errors=True)
            with contextlib.suppress(OSError):  # lost the race to a concurrent run: its copy is identical
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    read_meta(target)
    return target
