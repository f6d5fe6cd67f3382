"""Fused flash-style Triton kernels for the Sparse Transformer patterns (docs/design.md §4).

``triton_attention(q, k, v, pattern)`` factorizes instead of masking: a band or block term is a
causal band walked tile by tile in natural order, the strided stride term is causal attention inside
each residue class of the transposed sequence (index arithmetic, no copy), and the fixed summary
term reads a gathered compact K/V of the summary cells. A head's terms share one online softmax
(one launch) or, for strided ``both`` whose two terms need different query orders, two launches
where the second continues the first's softmax state. Memory is O(n) beyond q, k, v, out: an fp32
log-sum-exp per query (and delta in the backward).
"""

from __future__ import annotations

import torch

from ...patterns import Pattern
from ...runtime import DTYPES
from ..common import empty_attention, is_empty
from .ops import attention_fwd, encode

__all__ = ["triton_attention"]


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Causal attention restricted to ``pattern`` with fused Triton kernels (forward and backward).

    Args:
        q, k: ``[B, H, n, dk]``; v: ``[B, H, n, dv]``; fp16, bf16 or fp32, one dtype; any strides
            with a contiguous last dimension (others are copied). Head dims other than powers of
            two are padded inside the kernel.
        pattern: a per-layer pattern (an ``Interleaved`` one must be resolved with ``.for_layer``).
        scale: softmax scale, default ``dk ** -0.5``.
        deterministic: the backward is atomic-free and bitwise reproducible in either mode; the
            flag is accepted so callers can state the requirement.

    Returns: ``[B, H, n, dv]`` in ``q.dtype``. Queries with no allowed key give zeros (and zero
    gradients). With no query (``B``, ``H`` or ``n`` is 0) the result is an empty ``[B, H, n, dv]``
    tensor with empty gradients, and no kernel is launched.

    Raises:
        ValueError: another dtype, mismatched shapes, or an unresolved Interleaved pattern.
    """
    if q.dtype not in DTYPES.values():
        raise ValueError(f"triton attention takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"expected q, k [B, H, n, dk] and v [B, H, n, dv] of one dtype; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if is_empty(q):
        return empty_attention(q, k, v, pattern)
    spec = encode(pattern, q.shape[1])  # raises for Interleaved: call .for_layer(layer) first
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = attention_fwd(q, k, v, spec, scale, bool(deterministic))
    return out
