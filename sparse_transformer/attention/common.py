"""Helpers every attention backend shares: padding, the two rearrangements of a term's sequence,
head grouping and the exact merge of disjoint terms by log-sum-exp (docs/design.md §4).

The index rules themselves (run lengths, gaps, compact summary positions) are the pattern terms'
(:mod:`sparse_transformer.patterns`); these functions only move tensors according to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..patterns import Pattern, Stride, Summary, Term, _check_int

__all__ = [
    "by_head_group",
    "check_packed",
    "compute_dtype",
    "empty_attention",
    "from_runs",
    "gather_summary",
    "is_empty",
    "merge_by_lse",
    "merge_heads",
    "pad_to",
    "split_heads",
    "to_runs",
]


def is_empty(q: torch.Tensor) -> bool:
    """Whether ``q [B, H, n, dk]`` has no query at all (``B``, ``H`` or ``n`` is 0)."""
    return q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0


def empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The result of attention with no query (:func:`is_empty`): an empty ``[B, H, n, dv]`` tensor in
    ``q.dtype``, as ``F.scaled_dot_product_attention`` returns. It is connected to q, k and v, so
    ``torch.autograd.grad`` gives each of them an (empty) gradient of its own shape. The pattern is
    still checked: an unresolved :class:`~sparse_transformer.patterns.Interleaved` raises its
    ValueError, as it does for non-empty inputs."""
    pattern.terms(0)
    tie = q.sum(-1, keepdim=True) + k.sum(-1, keepdim=True)  # [B, H, n, 1], empty
    return (v + tie).to(q.dtype)


def check_packed(qkv, n_heads, qk_dim) -> tuple[int, int]:
    """``(n_heads, qk_dim)`` as ints for a packed projection ``qkv`` ``[B, n, W]`` (:func:`split_heads`;
    ``qk_dim`` None: a third of ``W``). Raises ValueError for a ``qkv`` that is not a 3-d tensor, a
    count that is not an integer (bool included), or widths that do not split into ``n_heads`` heads."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv must be a 3-d tensor [batch, n, width], got shape {tuple(getattr(qkv, 'shape', ()))}")
    _check_int("n_heads", n_heads, 1)
    width = qkv.shape[-1]
    if qk_dim is None:
        if width % 3:
            raise ValueError(f"qkv's width {width} is not three equal parts; pass qk_dim (the width of q and k)")
        qk_dim = width // 3
    _check_int("qk_dim", qk_dim, 1)
    n_heads, qk_dim = int(n_heads), int(qk_dim)
    dv = width - 2 * qk_dim
    if dv <= 0 or qk_dim % n_heads or dv % n_heads:
        raise ValueError(
            f"qkv of width {width} with q and k {qk_dim} wide does not split into {n_heads} heads: q, k and "
            "v (the rest of the width) must each be a positive multiple of n_heads"
        )
    return n_heads, qk_dim


def split_heads(qkv: torch.Tensor, n_heads: int, qk_dim: int) -> list[torch.Tensor]:
    """One packed projection ``[B, n, W]`` (its columns: q's heads, k's heads, v's heads) -> q, k
    ``[B, H, n, qk_dim / H]`` and v ``[B, H, n, (W - 2·qk_dim) / H]``, views of it (paper §4: the
    heads of one W_qkv projection)."""
    B, n, W = qkv.shape
    parts = qkv.split([qk_dim, qk_dim, W - 2 * qk_dim], dim=-1)
    # head dims spelled out: a view with -1 is ambiguous for B = 0 or n = 0
    return [t.view(B, n, n_heads, t.shape[-1] // n_heads).transpose(1, 2) for t in parts]


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, d]`` -> ``[B, n, H·d]``, the heads side by side (a view when ``y`` is laid out
    positions-major, as the backends return the heads of :func:`split_heads`)."""
    B, H, n, d = y.shape
    return y.transpose(1, 2).reshape(B, n, H * d)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics and accumulations run in for inputs of ``dtype``: float64 for
    float64 inputs, float32 for every other floating dtype (fp32, fp16, bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad dim 2 (the sequence) of ``[B, H, n, d]`` with zeros up to a multiple of ``multiple``."""
    extra = (-x.shape[2]) % multiple
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def to_runs(x: torch.Tensor, term: Stride) -> torch.Tensor:
    """``[B, H, n, d]`` -> ``[B, H, l, R, d]`` with ``l = term.size`` and ``R = term.run_length(n)``:
    the residue runs of the stride term (paper §5.5, "transpose, then a local window"). Run ``r``
    row ``t`` is position ``t·l + r``; positions past ``n`` are zeros. A view of the padded input."""
    B, H, n, d = x.shape
    l = term.size
    return pad_to(x, l).view(B, H, term.run_length(n), l, d).transpose(2, 3)


def from_runs(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`to_runs`: ``[B, H, l, R, *rest]`` -> ``[B, H, n, *rest]`` (``rest``
    may be empty, as for a log-sum-exp ``[B, H, l, R]``)."""
    B, H, l, R = x.shape[:4]
    return x.transpose(2, 3).reshape(B, H, R * l, *x.shape[4:])[:, :, :n]


def gather_summary(x: torch.Tensor, term: Summary) -> torch.Tensor:
    """``[B, H, n, d]`` -> ``[B, H, term.compact_length(n), d]``: the ``c`` summary cells of every
    block in position order (compact key ``s`` is position ``term.position(s)``; the cells of the
    padded last block past ``n`` are zeros and no query reads them)."""
    B, H, n, d = x.shape
    blocks = pad_to(x, term.size).view(B, H, -1, term.size, d)
    return blocks[:, :, :, term.lo : term.hi].reshape(B, H, term.compact_length(n), d)


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of disjoint key sets from each set's normalized output and
    log-sum-exp: ``parts`` is ``[(out [B, H, n, dv], lse [B, H, n] fp32), ...]``; an empty set has
    ``lse = -inf`` and weight 0, and a row empty in every part gives 0 (never NaN)."""
    if len(parts) == 1:
        return parts[0][0]
    outs = [o for o, _ in parts]
    lse = torch.stack([s for _, s in parts])  # [T, B, H, n]
    m = lse.amax(0).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)  # 0 for an empty term
    total = w.sum(0)
    total = torch.where(total > 0, total, torch.ones_like(total))
    return sum(wt.unsqueeze(-1) * o for wt, o in zip(w, outs)) / total.unsqueeze(-1)


def by_head_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Term, ...]], torch.Tensor],
) -> torch.Tensor:
    """Run ``attend(q, k, v, terms) -> [B, h, n, dv]`` once per group of heads that share a key set
    (``pattern.head_groups``: per-head summary offsets and the multi-head integration make groups)
    on ``q, k [B, H, n, dk]``, ``v [B, H, n, dv]``; returns ``[B, H, n, dv]`` with the heads back in
    order. Raises the pattern's ValueError for an unresolved :class:`~sparse_transformer.patterns.Interleaved`."""
    H = q.shape[1]
    groups = pattern.head_groups(H)
    results, order = [], []
    for terms, heads in groups:
        if len(groups) == 1:
            qs, ks, vs = q, k, v
        else:
            idx = torch.tensor(heads, device=q.device)
            qs, ks, vs = q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx)
        results.append(attend(qs, ks, vs, terms))
        order.extend(heads)
    out = results[0] if len(results) == 1 else torch.cat(results, dim=1)
    if order != list(range(H)):
        out = out.index_select(1, torch.tensor(order, device=q.device).argsort())
    return out
