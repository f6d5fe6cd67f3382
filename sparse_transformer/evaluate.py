"""Bits per dim (= bits per byte for text and audio): summed nats over summed tokens, over all ranks.

Units: one dim is one byte of the data, so the number is the same either way; commands print it as
"bits per byte" for text and audio and "bits per dim" for images (:func:`unit_of`), while keys in
metrics and results keep the general name ``*_bits_per_dim``.

Each split is tiled into non-overlapping windows of ``seq_len`` bytes (the last one may be shorter;
images: aligned parts of one image), every byte is scored exactly once with the context of its own
window, and ``bits_per_dim = sum(nats) / sum(tokens) / ln 2`` (docs/method.md §9). Never a mean of
per-window or per-batch means: windows of unequal length would be weighted wrongly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .data.loader import eval_windows, open_split, read_meta
from .model import cross_entropy
from .paths import check_run_dir
from .runtime import fall_back_backend, resolve_device, resolve_dtype


def unit_of(modality: str) -> str:
    """The printed name of the unit: ``"bits per dim"`` for images, ``"bits per byte"`` for text and audio."""
    return "bits per dim" if modality == "image" else "bits per byte"


def _batches(windows: list[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Group windows of equal length into batches of at most ``batch_size``, in order."""
    out: list[list[tuple[int, int]]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0][1] == w[1]:
            out[-1].append(w)
        else:
            out.append([w])
    return out


@torch.no_grad()
def bits_per_dim(
    model: nn.Module,
    data: np.ndarray,
    seq_len: int,
    record_len: int | None,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    max_tokens: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Summed negative log-likelihood of ``data`` under ``model``.

    Args:
        model: maps int64 ``[B, n]`` to logits ``[B, n, vocab]`` with ``logits[:, i]`` predicting
            ``x[:, i]`` (a SparseTransformer, or an FSDP2-sharded one: every rank then runs the same
            number of forward passes).
        data: uint8 ``[n_bytes]``, e.g. from :func:`~sparse_transformer.data.loader.open_split`.
        record_len: bytes per image (windows stay inside one image), or None.
        max_tokens: score only the first ``max_tokens`` bytes (a prefix of the split); None = all.
        progress: show a progress bar (bytes scored, on stderr) on rank 0.
    Returns:
        ``(total_nats, tokens)`` summed over this process's windows and, when torch.distributed is
        initialized, over all ranks (rank r scores windows r, r + world, ...).
        ``total_nats / tokens / ln 2`` is bits per dim.
    """
    device = torch.device(device)
    n_bytes = len(data) if max_tokens is None else min(len(data), max_tokens)
    windows = eval_windows(n_bytes, seq_len, record_len)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    batches = _batches(windows[rank::world], batch_size)
    # A sharded model all-gathers weights in every forward, so all ranks must run equally many.
    n_steps = max(len(_batches(windows[r::world], batch_size)) for r in range(world)) if world > 1 else len(batches)
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    bar = tqdm(
        total=n_bytes,
        disable=not progress or rank != 0,
        desc="eval",
        unit="B",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
    )
    for i in range(n_steps):
        batch = batches[min(i, len(batches) - 1)] if batches else [(0, min(seq_len, n_bytes))]
        x = torch.from_numpy(np.stack([np.asarray(data[s : s + n]) for s, n in batch]).astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = cross_entropy(logits, x, reduction="sum")
        if i < len(batches):  # padding passes of a rank with fewer windows are not counted
            nats += loss.double()
            tokens += x.numel()
            bar.update(x.numel() * world)
    bar.close()
    model.train(was_training)
    total = torch.stack([nats, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total[0].item(), int(total[1].item())


def evaluate(
    run: str | Path,
    split: str = "test",
    max_tokens: int | None = None,
    device="auto",
    data_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Bits per dim of a run's model (latest checkpoint, else the export) on one split of its data.

    Args:
        run: a run directory, or an export (config.json + model.safetensors).
        max_tokens: score only the first ``max_tokens`` bytes of the split; None = all of it.
        data_dir: prepared data to score instead of the run's ``data.dir`` (e.g. data that moved).
        progress: show a progress bar on stderr.
    Returns:
        dict with ``bits_per_dim``, ``unit`` (what it is called for this data: bits per byte or per
        dim), ``split``, ``tokens``, ``nats`` (summed), ``data_dir``, ``run``.
    Raises:
        UserError: a missing or broken run or data directory, an unknown split, ``max_tokens < 1``.
    """
    from .checkpoint import load_model
    from .data.loader import default_data_dir
    from .errors import UserError

    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"eval: --max-tokens {max_tokens} must be positive; omit it to score the whole split")
    check_run_dir(run, "eval: --run")
    if data_dir is not None:
        read_meta(data_dir)  # a bad --data is refused before the model is loaded
    dev = resolve_device(device, option="--device")
    model, cfg = load_model(run, dev)
    note = fall_back_backend(model, cfg.model, dev)
    if note:
        print(note, file=sys.stderr)
    data_dir = Path(data_dir or cfg.data.dir or default_data_dir())
    meta = read_meta(data_dir)
    data = open_split(data_dir, split)
    dtype = resolve_dtype(cfg.train.dtype, dev)
    nats, tokens = bits_per_dim(
        model,
        data,
        cfg.data.seq_len,
        meta["record_len"] or None,
        cfg.train.batch_size,
        dev,
        dtype,
        max_tokens,
        progress=progress,
    )
    return {
        "bits_per_dim": nats / tokens / math.log(2),
        "unit": unit_of(meta["modality"]),
        "split": split,
        "tokens": tokens,
        "nats": nats,
        "data_dir": str(data_dir),
        "run": str(run),
    }
