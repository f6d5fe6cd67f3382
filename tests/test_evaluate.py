"""Bits per dim: exact arithmetic on a known distribution, summed nats (not a mean of means), evaluate()."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY_RUN, overrides

from sparse_transformer.config import load_config
from sparse_transformer.evaluate import bits_per_dim, evaluate
from sparse_transformer.train import train


class FixedDistribution(nn.Module):
    """Every position predicts the same distribution ``softmax(logits)`` whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)


def true_bits(data: np.ndarray, logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), -1)
    return -logp[torch.from_numpy(data.astype(np.int64))].sum().item() / len(data) / math.log(2)


def test_bits_per_dim_of_a_known_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, generator=gen)
    data = np.random.default_rng(0).integers(0, 256, 1000).astype(np.uint8)
    model = FixedDistribution(logits)
    nats, tokens = bits_per_dim(model, data, 64, None, 4, "cpu", torch.float32)
    assert tokens == 1000  # 15 full windows and one of 40 bytes: every byte once
    assert nats / tokens / math.log(2) == pytest.approx(true_bits(data, logits), abs=1e-5)
    # a uniform model costs exactly 8 bits per byte
    nats, tokens = bits_per_dim(FixedDistribution(torch.zeros(256)), data, 64, None, 4, "cpu", torch.float32)
    assert nats / tokens / math.log(2) == pytest.approx(8.0, abs=1e-5)


def test_sums_nats_over_unequal_windows_not_mean_of_means():
    logits = torch.full((256,), -10.0)
    logits[0], logits[1] = 5.0, 0.0  # byte 0 cheap, byte 1 expensive
    data = np.zeros(100, dtype=np.uint8)
    data[96:] = 1  # the short last window (4 bytes of 32 + 32 + 32 + 4) is all expensive bytes
    nats, tokens = bits_per_dim(FixedDistribution(logits), data, 32, None, 2, "cpu", torch.float32)
    expected = true_bits(data, logits)
    assert tokens == 100 and nats / tokens / math.log(2) == pytest.approx(expected, abs=1e-5)
    per_window = [true_bits(data[s : s + 32], logits) for s in range(0, 100, 32)]
    assert abs(np.mean(per_window) - expected) > 1.0  # a mean of means would be far off


def test_max_tokens_scores_a_prefix():
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1))
    data = np.random.default_rng(1).integers(0, 256, 500).astype(np.uint8)
    nats, tokens = bits_per_dim(FixedDistribution(logits), data, 64, None, 3, "cpu", torch.float32, max_tokens=150)
    assert tokens == 150
    assert nats / tokens / math.log(2) == pytest.approx(true_bits(data[:150], logits), abs=1e-5)


def test_image_records_keep_windows_inside_images():
    logits = torch.randn(256, generator=torch.Generator().manual_seed(2))
    data = np.random.default_rng(2).integers(0, 256, 4 * 48).astype(np.uint8)  # 4 images of 48 bytes
    nats, tokens = bits_per_dim(FixedDistribution(logits), data, 24, 48, 3, "cpu", torch.float32)
    assert tokens == 192 and nats / tokens / math.log(2) == pytest.approx(true_bits(data, logits), abs=1e-5)


def test_evaluate_a_run_matches_the_training_summary(tmp_path, text_data):
    data = {"data.dir": text_data("letters", 30000)}
    cfg = load_config(None, overrides(data, TINY_RUN, {"model.n_layer": 1, "train.max_steps": 5}))
    summary = train(cfg, tmp_path / "run")
    result = evaluate(tmp_path / "run", split="test", device="cpu")
    assert result["split"] == "test" and result["tokens"] == summary["test_tokens"] == 1500
    assert result["bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"], abs=1e-9)
    assert result["nats"] / result["tokens"] / math.log(2) == pytest.approx(result["bits_per_dim"])
    assert evaluate(tmp_path / "run", split="val", max_tokens=100, device="cpu")["tokens"] == 100
