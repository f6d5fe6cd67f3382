"""FlexAttention backend: the factorization of ``factorized.py`` with one Flex call per term.

Each head's key set is a disjoint union of terms (:mod:`sparse_transformer.patterns`). A Flex
``BlockMask`` skips only whole 128 x 128 tiles, and strided's stride part and fixed's summary
columns touch every tile of the ``n x n`` score matrix (docs/design.md §4), so the pattern is never
given to Flex as one mask. Each term becomes a Flex call on a rearranged sequence whose mask is
dense in few tiles:

* ``Band(w)``    sliding window ``i - w < j <= i`` (``w=None``: causal) on the sequence itself.
* ``Block(l)``   block-diagonal causal: ``j // l == i // l``, ``j <= i``.
* ``Stride(l)``  the sequence viewed as ``[n/l, l]`` and transposed, so each residue class ``i mod l``
                 is a contiguous run of ``R = ceil(n/l)`` positions; the term is causal attention
                 inside runs (block-causal-within-runs mask), rows at least ``ceil(min_distance/l)``
                 apart.
* ``Summary``    the summary cells of every block gathered into a compact K/V of length
                 ``c·ceil(n/l)``; a query reads the summaries of earlier blocks (block-causal mask)
                 or, for the standalone summary part, every summary cell ``j <= i``.

The terms' normalized outputs are merged exactly by their log-sum-exps (Flex returns them in fp32),
the same merge as the ``factorized`` backend. Block masks are built with
``create_block_mask(..., _compile=True)`` (O(n) memory, no ``n x n`` mask) and cached per
``(term, n, device)``; ``flex_attention`` is compiled once per process.

This is the "composed Flex" baseline of docs/benchmarks.md, for every pattern. CUDA is its target; on other
devices it runs Flex's unfused eager path (O(n^2) memory), which is useful only for small checks.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ..patterns import Band, Block, Pattern, Stride, Summary, Term
from .common import by_head_group, empty_attention, from_runs, gather_summary, is_empty, merge_by_lse, to_runs

try:  # torch >= 2.9 asks for the log-sum-exp through an AuxRequest; return_lse is deprecated there
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

__all__ = ["flex_attention_sparse"]


@functools.cache
def _compiled_flex():
    """``flex_attention`` compiled once. Every distinct mask function and shape is its own graph
    (a benchmark over patterns x lengths x fwd/bwd needs dozens), so the recompile limit is raised
    from its default of 8: past it Dynamo would fall back to the unfused O(n^2) eager path."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask: BlockMask, scale: float):
    """One Flex call: ``q [B, H, Q, dk]``, ``k [B, H, K, dk]``, ``v [B, H, K, dv]`` ->
    ``(out [B, H, Q, dv], lse [B, H, Q] fp32)``; rows with no allowed key give 0 and ``-inf``."""
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    if AuxRequest is not None:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)


def _mask_mod(term: Term, n: int):
    """The term's mask on the (rearranged) sequence it is computed on, and ``(Q_LEN, KV_LEN)``:
    the term's own rule (:mod:`sparse_transformer.patterns`) in the coordinates of that sequence."""
    if isinstance(term, (Band, Block)):
        return (lambda b, h, i, j: term.allows(i, j)), (n, n)
    if isinstance(term, Stride):  # the runs laid end to end: index run·R + row, R = run length
        R = term.run_length(n)
        # same run, and rows far enough apart (the row difference is i - j inside one run)
        return (lambda b, h, i, j: (i // R == j // R) & term.run_allows(i, j)), (R * term.size, R * term.size)
    if isinstance(term, Summary):
        return (lambda b, h, i, s: term.allows_compact(i, s)), (n, term.compact_length(n))
    raise TypeError(f"unknown pattern term {term!r}")


@functools.lru_cache(maxsize=128)
def _block_mask(term: Term, n: int, device: torch.device) -> BlockMask:
    """The cached Flex ``BlockMask`` of ``term`` at length ``n`` (shared by every batch and head)."""
    mask_mod, (q_len, kv_len) = _mask_mod(term, n)
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, _compile=device.type == "cuda")


def _term(q, k, v, term: Term, scale: float):
    """``(out [B, H, n, dv] fp32-or-input dtype, lse [B, H, n] fp32)`` of one term."""
    B, H, n, _ = q.shape
    bm = _block_mask(term, n, q.device)
    if isinstance(term, (Band, Block)):
        return _flex(q, k, v, bm, scale)
    if isinstance(term, Stride):

        def runs(x):  # [B, H, n, d] -> [B, H, l*R, d]: the residue runs laid end to end
            return to_runs(x, term).reshape(B, H, -1, x.shape[-1])

        out, lse = _flex(runs(q), runs(k), runs(v), bm, scale)
        l, R = term.size, term.run_length(n)
        return from_runs(out.view(B, H, l, R, -1), n), from_runs(lse.view(B, H, l, R), n)
    return _flex(q, gather_summary(k, term), gather_summary(v, term), bm, scale)


def flex_attention_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``, one FlexAttention call per pattern term (paper
    §4.2 Eqs. 2-4, computed by term as in §5.5; docs/design.md §4).

    Args:
        q, k: ``[B, H, n, dk]``; v: ``[B, H, n, dv]`` (same dtype and CUDA device).
        pattern: from :mod:`sparse_transformer.patterns`; head ``h`` reads ``pattern.mask(n, h)``;
            an unresolved Interleaved pattern raises ValueError.
        scale: softmax scale, default ``dk ** -0.5``.

    Returns: ``[B, H, n, dv]`` in ``q.dtype``; queries with no allowed key give zeros.
    Heads with identical key sets are computed together, as in the ``factorized`` backend. With no
    query (``B``, ``H`` or ``n`` is 0) the result is an empty ``[B, H, n, dv]`` tensor (no Flex call,
    so this holds on every device and under autograd).
    """
    if is_empty(q):
        return empty_attention(q, k, v, pattern)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = by_head_group(
        q, k, v, pattern, lambda qs, ks, vs, terms: merge_by_lse([_term(qs, ks, vs, t, scale) for t in terms])
    )
    return out.to(q.dtype)
