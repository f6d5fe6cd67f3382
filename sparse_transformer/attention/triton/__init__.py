"""Fused flash-style Triton kernels for the Sparse Transformer patterns (docs/design.md §4).

``triton_attention(q, k, v, pattern)`` factorizes instead of masking: a band or block term is a
causal band walked tile by tile in natural order, the strided stride term is causal attention inside
each residue class of the transposed sequence (index arithmetic, no copy), and the fixed summary
term reads a gathered compact K/V of the summary cells. A head's terms share one online softmax
(one launch) or, for strided ``both`` whose two terms need different query orders, two launches
where the second continues the first's softmax state. Memory is O(n) beyond q, k, v, out: an fp32
log-sum-exp per query (and delta in the backward).

On CPU tensors the kernels run on Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
this package was first imported (slow; for debugging and the CPU tests).
"""

from __future__ import annotations

import os

import torch

from ...patterns import Pattern
from ...runtime import DTYPES
from .. import needs_cuda
from ..common import check_packed, empty_attention, is_empty, merge_heads, split_heads
from . import ops
from .ops import attention_fwd, encode
from .tiles import Tile, Tuning, tile_config

__all__ = ["Tile", "Tuning", "tile_config", "triton_attention", "triton_attention_qkvpacked"]


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """Causal attention restricted to ``pattern`` with fused Triton kernels (forward and backward).

    Args:
        q, k: ``[B, H, n, dk]``; v: ``[B, H, n, dv]``; fp16, bf16 or fp32, one dtype; any strides
            with a contiguous last dimension (others are copied). Head dims other than powers of
            two are padded inside the kernel. CUDA tensors, or CPU tensors under Triton's
            interpreter (``TRITON_INTERPRET=1`` set before the first import of this package).
        pattern: a per-layer pattern (an ``Interleaved`` one must be resolved with ``.for_layer``).
        scale: softmax scale, default ``dk ** -0.5``.
        tuning: a per-call override of the tile choice (:class:`Tuning`), for tuning sweeps and
            tests; ``None`` takes :func:`tile_config`'s tables. The backward of this call uses it too.

    Returns: ``[B, H, n, dv]`` in ``q.dtype``, laid out in q's order, and so are the gradients
    (:func:`ops.heads_like`: positions-major, ``[B, n, H, dv]`` in memory, when q's heads are closer
    in memory than its positions, as for views of one ``[B, n, 3·d]`` projection; contiguous
    otherwise). Queries with no allowed key give zeros (and zero gradients). With no query (``B``,
    ``H`` or ``n`` is 0) the result is an empty ``[B, H, n, dv]`` tensor with empty gradients, and
    no kernel is launched. The backward is atomic-free: its gradients are bitwise reproducible.

    Raises:
        ValueError: another dtype, mismatched shapes, CPU tensors without the interpreter, a
            ``tuning`` that is not a :class:`Tuning`, or an unresolved Interleaved pattern.
    """
    spec, scale = _checked(q, k, v, pattern, scale, tuning)
    if is_empty(q):
        return empty_attention(q, k, v, pattern)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = attention_fwd(q, k, v, spec, scale, tuning.encode() if tuning else [])
    return out


def triton_attention_qkvpacked(
    qkv: torch.Tensor,
    n_heads: int,
    qk_dim: int,
    pattern: Pattern,
    scale: float | None = None,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """:func:`triton_attention` of the heads of one packed projection, heads merged: the kernels
    read q, k, v in place and the backward writes their gradients into one tensor of ``qkv``'s
    shape (the gradient the projection's backward takes; three separate ones would be concatenated
    by a copy).

    Args:
        qkv: ``[B, n, 2·qk_dim + H·dv]``, the columns q's heads, k's heads, v's heads
            (``common.split_heads``); the other arguments as :func:`triton_attention`.

    Returns: ``[B, n, H·dv]`` in ``qkv.dtype`` (contiguous); its gradient of ``qkv`` is contiguous.

    Raises: as :func:`triton_attention`, and ValueError for a ``qkv``, ``n_heads`` or ``qk_dim``
    that ``common.check_packed`` refuses.
    """
    n_heads, qk_dim = check_packed(qkv, n_heads, qk_dim)
    q, k, v = split_heads(qkv, n_heads, qk_dim)
    spec, scale = _checked(q, k, v, pattern, scale, tuning)
    if is_empty(q):
        return merge_heads(empty_attention(q, k, v, pattern))
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    out, _ = ops.attention_qkvpacked_fwd(qkv, n_heads, qk_dim, spec, scale, tuning.encode() if tuning else [])
    return out


def _checked(q, k, v, pattern, scale, tuning) -> tuple[list[int], float]:
    """The kernels' pattern spec (``[]`` for inputs without a query) and softmax scale for these
    inputs, or the ValueError of :func:`triton_attention`."""
    if q.dtype not in DTYPES.values():
        raise ValueError(f"triton attention takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"expected q, k [B, H, n, dk] and v [B, H, n, dv] of one dtype; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if tuning is not None and not isinstance(tuning, Tuning):
        raise ValueError(
            f"tuning must be a sparse_transformer.attention.triton.Tuning or None, got {type(tuning).__name__}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if is_empty(q):
        return [], scale  # no kernel runs (the callers' empty_attention checks the pattern)
    spec = encode(pattern, q.shape[1])  # raises for Interleaved: call .for_layer(layer) first
    if q.device.type != "cuda" and not ops.INTERPRET:
        raise ValueError(_not_interpreted(q.device.type))
    return spec, scale


def _not_interpreted(device_type: str) -> str:
    """The error for tensors off CUDA when the kernels were compiled (not interpreted)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return needs_cuda("triton", device_type)
    return (
        "backend 'triton' got CPU tensors, but its kernels were compiled for CUDA: TRITON_INTERPRET=1 must be set "
        "before sparse_transformer.attention.triton is first imported (e.g. in the shell) to run them on Triton's "
        f"CPU interpreter; or use backend='factorized' on {device_type}"
    )
