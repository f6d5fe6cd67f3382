"""Shared test setup: `gpu` tests skip without CUDA, `distributed` tests without torch.distributed;
the prepared text data the training, evaluation and torchrun tests share."""

import numpy as np
import pytest
import torch

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
