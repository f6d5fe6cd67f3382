"""Model FLOPs per token (6·params + the pattern's attention pairs) and the peak table behind MFU."""

import pytest
import torch

from sparse_transformer.config import load_config
from sparse_transformer.flops import attention_pairs, matmul_params, peak_tflops, train_flops_per_token
from sparse_transformer.model import SparseTransformer


@pytest.mark.parametrize("extra", [[], ["--model.qk_ratio", "0.5", "--model.ff_mult", "2", "--model.bias", "false"]])
def test_matmul_params_are_the_models_matrices(extra):
    cfg = load_config(None, ["--model.n_layer", "3", "--model.d_model", "64", "--model.n_head", "4", *extra]).model
    with torch.device("meta"):
        model = SparseTransformer(cfg)
    matrices = sum(
        p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name.startswith(("blocks.", "head."))
    )
    assert matmul_params(cfg) == matrices


def test_attention_is_charged_for_allowed_pairs_only():
    base = [
        "--model.n_layer",
        "2",
        "--model.d_model",
        "64",
        "--model.n_head",
        "4",
        "--data.seq_len",
        "64",
        "--model.stride",
        "8",
    ]
    dense = load_config(None, [*base, "--model.pattern", "dense"]).model
    strided = load_config(None, [*base, "--model.pattern", "strided"]).model
    n = 64
    assert attention_pairs(dense) == [4 * n * (n + 1) // 2] * 2  # 4 heads, causal
    # strided l = 8 at n = 64: query i reads min(i+1, 8) local keys and the earlier keys l, 2l, ... back
    per_head = sum(min(i + 1, 8) + i // 8 for i in range(n))
    assert attention_pairs(strided) == [4 * per_head] * 2
    width = (64 + 64) / 4
    assert train_flops_per_token(dense) == pytest.approx(6 * matmul_params(dense) + 6 * width * 2 * 4 * (n + 1) / 2)
    assert train_flops_per_token(strided) < train_flops_per_token(dense)
    # interleaved integration: the two parts alternate over layers, each charged on its own
    inter = load_config(None, [*base, "--model.pattern", "strided", "--model.integration", "interleaved"]).model
    pairs = attention_pairs(inter)
    assert pairs[0] != pairs[1] and sum(pairs) < sum(attention_pairs(strided))
    with pytest.raises(ValueError, match="must be positive"):
        train_flops_per_token(dense, 0)


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert (
        peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L40") == 181.0 and peak_tflops("NVIDIA L4") == 121.0
    )
    assert peak_tflops("Some Future GPU") is None
    assert peak_tflops("Some Future GPU", configured=500.0) == 500.0
    assert peak_tflops("NVIDIA H200", configured=100.0) == 100.0
