"""The oracle: dense masked softmax attention in fp32 (float64 for float64 inputs). O(n^2) memory; for
tests and small n."""

from __future__ import annotations

import torch

from ..patterns import Pattern
from .common import compute_dtype, empty_attention, is_empty


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Attention of ``q [B, H, n, dk]``, ``k [B, H, n, dk]``, ``v [B, H, n, dv]`` under ``pattern``
    (head ``h`` uses ``pattern.mask(n, head=h)``), computed in fp32 (float64 inputs in float64, so
    ``torch.autograd.gradcheck`` applies) and returned ``[B, H, n, dv]`` in ``q.dtype``.

    A query with no allowed key gets a zero output (and zero gradients), never NaN. With no query at
    all (``B``, ``H`` or ``n`` is 0) the result is an empty ``[B, H, n, dv]`` tensor.
    """
    if is_empty(q):
        return empty_attention(q, k, v, pattern)
    H, n, dk = q.shape[1:]
    ct = compute_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else scale
    mask = torch.stack([pattern.mask(n, head=h) for h in range(H)]).to(q.device)  # [H, n, n]
    s = torch.einsum("bhid,bhjd->bhij", q.to(ct), k.to(ct)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty rows: keep exp() finite
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhij,bhjd->bhid", p, v.to(ct)).to(q.dtype)
