"""Factorized sparse attention in pure PyTorch: any device, autograd, O(n·sqrt(n)) memory.

Each head's key set is a disjoint union of terms (see :mod:`sparse_transformer.patterns`). Every
term is computed as *dense* attention on a rearranged sequence, never as a mask over ``n x n``:

* ``Band(w)``    chunks of ``w`` queries read their own and the previous chunk: scores ``[n, 2w]``.
* ``Block(l)``   block-diagonal causal attention: scores ``[n, l]``.
* ``Stride(l)``  the sequence viewed as ``[n/l, l]`` and transposed, so each residue class ``i mod l``
                 is a contiguous run of length ``n/l`` and the term is causal attention inside runs:
                 scores ``[n, n/l]``.
* ``Summary``    the ``c`` summary cells of every block gathered into a compact K/V of length
                 ``c·n/l``: scores ``[n, c·n/l]`` (a quarter of dense for the paper's c/l = 1/4).

Each term returns its normalized output and its log-sum-exp; the terms are merged exactly by
log-sum-exp (they are disjoint, so no key counts twice). Lengths that are not a multiple of the
term's size are padded at the end; causality keeps real queries from reading padded keys.

Matrix products run in the input dtype; the softmax and the merge run in fp32. The rearranged
copies of q, k and v are kept in fp32 and cast right before each product, so the gradients of the
terms are summed in fp32 and rounded to the input dtype once. float64 inputs are computed entirely
in float64 (products, softmax, merge and the hand-written backward), so ``torch.autograd.gradcheck``
applies to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patterns import Band, Block, Pattern, Stride, Summary
from .common import (
    by_head_group,
    compute_dtype,
    empty_attention,
    from_runs,
    gather_summary,
    is_empty,
    merge_by_lse,
    pad_to,
    to_runs,
)


def _masked_scores(q, k, allowed, scale, dt):
    """Scores ``q·kᵀ·scale`` of ``[..., Q, K]`` in :func:`compute_dtype` of ``dt`` (fp32, float64 for
    float64) with disallowed pairs at -inf (products in ``dt``)."""
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)).to(compute_dtype(dt)).mul_(scale)
    return s.masked_fill_(~allowed, float("-inf"))


class _TermAttention(torch.autograd.Function):
    """Masked softmax attention of one term with its log-sum-exp, recomputed in the backward pass.

    Only q, k, v, the output and the log-sum-exp are kept for the backward (the paper's
    recomputation, §5.4): the ``[Q, K]`` probabilities exist only transiently, once per pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale, dt):
        s = _masked_scores(q, k, allowed, scale, dt)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty rows: keep exp() finite
        p = s.sub_(m).exp_()
        denom = p.sum(-1, keepdim=True)
        p = p.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
        out = torch.matmul(p.to(dt), v.to(dt)).to(p.dtype)
        lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(denom, float("-inf"))).squeeze(-1)
        ctx.save_for_backward(q, k, v, allowed, lse)
        ctx.scale, ctx.dt = scale, dt
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, allowed, lse = ctx.saved_tensors
        scale, dt = ctx.scale, ctx.dt
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1)
        p = _masked_scores(q, k, allowed, scale, dt).sub_(lse).exp_()  # 0 where masked or empty
        dv = torch.matmul(p.to(dt).transpose(-1, -2), dout.to(dt)).to(p.dtype)
        # d out / d s_j = p_j (v_j - out) and d lse / d s_j = p_j, so
        # ds = p * dp - p * (sum_j p_j dp_j - dlse) with dp = dout · vᵀ (delta from p·dp, not dout·out,
        # keeps a one-key row's gradient exactly zero in low precision)
        pdp = torch.matmul(dout.to(dt), v.to(dt).transpose(-1, -2)).to(p.dtype).mul_(p)
        delta = pdp.sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse.unsqueeze(-1)
        ds = pdp.addcmul_(p, delta, value=-1).mul_(scale).to(dt)
        dq = torch.matmul(ds, k.to(dt)).to(p.dtype)
        dk = torch.matmul(ds.transpose(-1, -2), q.to(dt)).to(p.dtype)
        return dq, dk, dv, None, None, None


def _softmax_lse(q, k, v, allowed, scale, dt):
    """``(out [..., Q, dv], lse [..., Q])`` in fp32 (float64 for ``dt`` float64) of q ``[..., Q, dk]``
    over the allowed keys of k ``[..., K, dk]``; a row with no allowed key gives ``out = 0``,
    ``lse = -inf`` and zero gradients."""
    return _TermAttention.apply(q, k, v, allowed, scale, dt)


def _band(q, k, v, term: Band, scale, dt):
    n = q.shape[2]
    if term.covers(n):  # the band reaches everything: plain causal attention
        i = torch.arange(n, device=q.device)
        return _softmax_lse(q, k, v, term.allows(i.view(n, 1), i.view(1, n)), scale, dt)
    w = term.window
    B, H, _, dk = q.shape
    qc, kc, vc = (pad_to(x, w) for x in (q, k, v))
    C = qc.shape[2] // w
    qc = qc.view(B, H, C, w, dk)
    kc = kc.view(B, H, C, w, dk)
    vc = vc.view(B, H, C, w, v.shape[-1])
    # keys of chunk c: chunk c-1 then chunk c (chunk -1 is zeros and masked out)
    k2 = torch.cat([F.pad(kc, (0, 0, 0, 0, 1, 0))[:, :, :C], kc], dim=3)
    v2 = torch.cat([F.pad(vc, (0, 0, 0, 0, 1, 0))[:, :, :C], vc], dim=3)
    t = torch.arange(w, device=q.device).view(w, 1)  # query offset in its chunk
    u = torch.arange(2 * w, device=q.device).view(1, 2 * w)  # key offset from the previous chunk
    allowed = term.allows(t + w, u)  # query t + w and key u, both counted from the previous chunk
    first = torch.arange(C, device=q.device).view(C, 1, 1) > 0
    allowed = allowed & (first | (u >= w))
    out, lse = _softmax_lse(qc, k2, v2, allowed, scale, dt)
    return out.reshape(B, H, C * w, -1)[:, :, :n], lse.reshape(B, H, C * w)[:, :, :n]


def _block(q, k, v, term: Block, scale, dt):
    B, H, n, dk = q.shape
    l = term.size
    qb, kb, vb = (pad_to(x, l) for x in (q, k, v))
    C = qb.shape[2] // l
    qb, kb = qb.view(B, H, C, l, dk), kb.view(B, H, C, l, dk)
    vb = vb.view(B, H, C, l, v.shape[-1])
    t = torch.arange(l, device=q.device)
    allowed = term.allows(t.view(l, 1), t.view(1, l))  # offsets inside one block
    out, lse = _softmax_lse(qb, kb, vb, allowed, scale, dt)
    return out.reshape(B, H, C * l, -1)[:, :, :n], lse.reshape(B, H, C * l)[:, :, :n]


def _stride(q, k, v, term: Stride, scale, dt):
    n = q.shape[2]
    r = torch.arange(term.run_length(n), device=q.device)
    allowed = term.run_allows(r.view(-1, 1), r.view(1, -1))
    out, lse = _softmax_lse(to_runs(q, term), to_runs(k, term), to_runs(v, term), allowed, scale, dt)
    return from_runs(out, n), from_runs(lse, n)


def _summary(q, k, v, term: Summary, scale, dt):
    n = q.shape[2]
    i = torch.arange(n, device=q.device).view(n, 1)
    s = torch.arange(term.compact_length(n), device=q.device).view(1, -1)
    return _softmax_lse(q, gather_summary(k, term), gather_summary(v, term), term.allows_compact(i, s), scale, dt)


_TERMS = {Band: _band, Block: _block, Stride: _stride, Summary: _summary}


def factorized_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Causal attention restricted to ``pattern`` in pure PyTorch (paper §4.2 Eqs. 2-4, computed by
    term as the paper's §5.5 describes).

    Args:
        q, k: ``[B, H, n, dk]``; v: ``[B, H, n, dv]``, one dtype and device.
        pattern: head ``h`` reads ``pattern.mask(n, h)``; an unresolved Interleaved pattern raises
            ValueError.
        scale: softmax scale, default ``dk ** -0.5``.

    Returns: ``[B, H, n, dv]`` in ``q.dtype``; queries with no allowed key give zeros. float64
    inputs are computed in float64 (``torch.autograd.gradcheck`` passes); other dtypes accumulate
    in fp32. With no query (``B``, ``H`` or ``n`` is 0) the result is an empty ``[B, H, n, dv]``
    tensor whose gradients are empty tensors of the inputs' shapes.
    """
    if is_empty(q):
        return empty_attention(q, k, v, pattern)
    dt = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = compute_dtype(dt)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)  # no-ops for fp32 and float64 inputs
    out = by_head_group(
        q,
        k,
        v,
        pattern,
        lambda qs, ks, vs, terms: merge_by_lse([_TERMS[type(t)](qs, ks, vs, t, scale, dt) for t in terms]),
    )
    return out.to(dt)
