"""Shared test setup: `gpu` tests skip without CUDA, `distributed` tests without torch.distributed;
the prepared data (synthetic text, or folders written by hand) and the tiny runs' config overrides
that the training, evaluation, sampling, benchmark and torchrun tests share; one thread for the
decoding tests."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_transformer.data.format import FORMAT_VERSION
from sparse_transformer.data.prepare import prepare


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_dist = pytest.mark.skip(reason="needs torch.distributed")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "distributed" in item.keywords and not torch.distributed.is_available():
            item.add_marker(no_dist)


def _letters(size: int) -> bytes:
    """``size`` random lowercase letters (seed 0): nothing to learn beyond their frequencies."""
    return bytes(np.random.default_rng(0).integers(97, 123, size).astype(np.uint8))


def _words(count: int) -> bytes:
    """``count`` words drawn from a fixed random vocabulary of 200 (seed 0): learnable, not trivial."""
    rng = np.random.default_rng(0)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 8))) for _ in range(200)]
    return " ".join(rng.choice(words, count)).encode()


CORPORA = {"letters": _letters, "words": _words}


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """``text_data(kind, size)`` -> a folder written by ``prepare("text", ...)`` from a synthetic corpus
    (``kind``: ``letters``, ``size`` bytes; or ``words``, ``size`` words), made once per session."""
    made = {}

    def make(kind: str, size: int):
        if (kind, size) not in made:
            root = tmp_path_factory.mktemp(f"text-{kind}-{size}")
            (root / "corpus.txt").write_bytes(CORPORA[kind](size))
            prepare("text", root / "corpus.txt", root / "data", progress=False)
            made[kind, size] = root / "data"
        return made[kind, size]

    return make


def write_prepared(root, splits: dict, modality: str, kind=None, record_len=None, shape=None, sample_rate=None):
    """A prepared data folder written by hand: ``splits`` maps each split name to its bytes; the
    meta.json is one that ``read_meta`` accepts (``kind`` defaults to the modality). Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True)
    for split, data in splits.items():
        (root / f"{split}.bin").write_bytes(data)
    meta = {
        "kind": kind or modality,
        "modality": modality,
        "record_len": record_len,
        "shape": shape,
        "sample_rate": sample_rate,
        "splits": {split: len(data) for split, data in splits.items()},
        "source": "test",
        "format_version": FORMAT_VERSION,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


# The tiny CPU runs of the tests, as ``--section.key`` settings (``overrides`` turns them into CLI
# arguments): a test takes one of these and states only what it changes.
TINY_MODEL = {"model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.stride": 16, "model.c": 4}
"""2 layers of width 32, 2 heads, fixed l = 16, c = 4."""
TINY_RUN = {**TINY_MODEL, "data.seq_len": 64, "train.batch_size": 4, "train.device": "cpu", "train.progress": False}
"""The tiny model trained on CPU, 4 windows of 64 bytes a step, no progress bar."""
FAULT_RUN = {**TINY_RUN, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1, "train.test_tokens": 256}
"""TINY_RUN as the fault tests watch it: every step logged, no evaluation during training, 256 test bytes at the end."""
SMALLEST_MODEL = {"model.n_layer": 1, "model.d_model": 16, "model.n_head": 2, "model.stride": 8, "model.c": 2}
"""1 layer of width 16, 2 heads, fixed l = 8, c = 2."""


def overrides(*settings: dict) -> list[str]:
    """``["--model.n_layer", "2", ...]`` from ``{"model.n_layer": 2, ...}`` dicts merged in order (a
    later value wins); True/False are written ``true``/``false``, anything else (paths too) as ``str``."""
    merged = {}
    for s in settings:
        merged |= s
    return [arg for key, value in merged.items() for arg in (f"--{key}", _text(value))]


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
def one_thread():
    """Decoding is many tiny ops: extra threads only add contention (tests slow down 20x on a busy host).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
