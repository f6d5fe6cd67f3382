"""Data layer: ``prepare`` raw files into flat uint8 splits, read them with numpy.memmap, mu-law audio.

prepare("text", "corpus.txt.xz", "data/corpus")      # -> train/val/test.bin + meta.json
meta = read_meta("data/corpus")
train = open_split("data/corpus", "train")          # uint8 memmap [n_bytes]
x = sample_batch(train, 8, 1024, rng)                # int64 [8, 1024]

The loader's names are imported on first use (it imports torch; ``prepare`` and ``mulaw`` do not).
"""

from __future__ import annotations

import importlib

# Bound here, not lazily: the function ``prepare`` must shadow its submodule of the same name.
from .mulaw import mulaw_decode, mulaw_encode, write_wav
from .prepare import KINDS, prepare

_EXPORTS = {
    "default_data_dir": ".loader",
    "eval_windows": ".loader",
    "open_split": ".loader",
    "read_meta": ".loader",
    "sample_batch": ".loader",
}

__all__ = [
    "KINDS",
    "default_data_dir",
    "eval_windows",
    "mulaw_decode",
    "mulaw_encode",
    "open_split",
    "prepare",
    "read_meta",
    "sample_batch",
    "write_wav",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
