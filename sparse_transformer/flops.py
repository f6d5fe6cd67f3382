"""Model FLOPs per token, achieved TFLOP/s and model FLOPs utilization (MFU) of training.

A training step costs about three forward passes (the backward pass twice the forward), and a
forward pass costs two FLOPs per multiply-add. Per token of one sequence of length ``n``:

* matrices: ``6 · P`` where ``P`` counts the weights of every matrix product (W_qkv, W_p, W_1, W_2 of
  each block and W_out); embedding look-ups, LayerNorm and biases are not matrix products.
* attention: ``3 · 2 · (d_qk/H + d/H) · pairs / n`` per head and layer, where ``pairs`` is the number
  of (query, key) pairs the layer's pattern allows for that head (``Pattern.num_pairs``): one
  multiply-add per pair and width for Q·K^T and one for P·V. A sparse pattern is charged only for
  what it reads, so the counts of a sparse and a dense model of the same shape differ.

These are model FLOPs: recomputation (``model.checkpoint``) and the factorized backends' extra work
are not counted, so MFU compares runs that do the same useful work. MFU divides the achieved rate by
the peak of the accelerators: ``train.peak_tflops`` when set, else the dense bf16/fp16 tensor-core
peak of a known GPU (:data:`PEAK_TFLOPS`); it is left out on CPU and for unknown GPUs.
"""

from __future__ import annotations

from .config import ModelConfig

# Dense (no structured sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' data
# sheets, matched against ``torch.cuda.get_device_name()``; the first matching entry wins, so more
# specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),
    ("H800", 989.5),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product per token: the blocks' W_qkv, W_p, W_1, W_2 and W_out."""
    d = cfg.d_model
    d_qk = int(d * cfg.qk_ratio)
    hidden = int(cfg.ff_mult * d)
    per_layer = d * (2 * d_qk + d) + d * d + 2 * d * hidden
    return cfg.n_layer * per_layer + d * cfg.vocab_size


def attention_pairs(cfg: ModelConfig, n: int | None = None) -> list[int]:
    """Allowed (query, key) pairs summed over the heads, one entry per layer, at length ``n`` (default n_ctx)."""
    from .model import model_pattern

    n = cfg.n_ctx if n is None else n
    pattern = model_pattern(cfg)
    cache: dict = {}
    out = []
    for layer in range(cfg.n_layer):
        total = 0
        for terms, heads in pattern.for_layer(layer).head_groups(cfg.n_head):
            if terms not in cache:
                cache[terms] = pattern.for_layer(layer).num_pairs(n, heads[0])
            total += cache[terms] * len(heads)
        out.append(total)
    return out


def train_flops_per_token(cfg: ModelConfig, n: int | None = None) -> float:
    """Model FLOPs of one training step (forward and backward) per token of sequences of length ``n``.

    ``6 · matmul_params + 6 · (d_qk + d) / H · pairs / n`` (module docstring). ``n`` defaults to
    ``cfg.n_ctx``; raises ValueError for ``n < 1``.
    """
    n = cfg.n_ctx if n is None else n
    if n < 1:
        raise ValueError(f"sequence length {n} must be positive")
    head_width = (int(cfg.d_model * cfg.qk_ratio) + cfg.d_model) / cfg.n_head
    attention = 6.0 * head_width * sum(attention_pairs(cfg, n)) / n
    return 6.0 * matmul_params(cfg) + attention


def peak_tflops(device_name: str, configured: float = 0.0) -> float | None:
    """The peak TFLOP/s of one accelerator: ``configured`` when positive, else the table's entry for
    the first name in :data:`PEAK_TFLOPS` contained in ``device_name``, else None."""
    if configured > 0:
        return configured
    for name, peak in PEAK_TFLOPS:
        if name in device_name:
            return peak
    return None
