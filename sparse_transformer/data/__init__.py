"""Data layer: ``prepare`` raw files into flat uint8 splits, read them with numpy.memmap, mu-law audio.

prepare("text", "corpus.txt.xz", "data/corpus")      # -> train/val/test.bin + meta.json
meta = read_meta("data/corpus")
train = open_split("data/corpus", "train")          # uint8 memmap [n_bytes]
x = sample_batch(train, 8, 1024, rng)                # int64 [8, 1024]
"""

from .loader import default_data_dir, eval_windows, open_split, read_meta, sample_batch
from .mulaw import mulaw_decode, mulaw_encode, write_wav
from .prepare import KINDS, prepare

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
