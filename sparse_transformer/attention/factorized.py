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
terms are summed in fp32 and rounded to the input dtype once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patterns import Band, Block, Stride, Summary, _PatternBase


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad dim 2 (the sequence) of ``[B, H, n, d]`` with zeros up to a multiple of ``multiple``."""
    extra = (-x.shape[2]) % multiple
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _masked_scores(q, k, allowed, scale, dt):
    """fp32 scores ``q·kᵀ·scale`` of ``[..., Q, K]`` with disallowed pairs at -inf (products in ``dt``)."""
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)).float().mul_(scale)
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
        out = torch.matmul(p.to(dt), v.to(dt)).float()
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
        dv = torch.matmul(p.to(dt).transpose(-1, -2), dout.to(dt)).float()
        # d out / d s_j = p_j (v_j - out) and d lse / d s_j = p_j, so
        # ds = p * dp - p * (sum_j p_j dp_j - dlse) with dp = dout · vᵀ (delta from p·dp, not dout·out,
        # keeps a one-key row's gradient exactly zero in low precision)
        pdp = torch.matmul(dout.to(dt), v.to(dt).transpose(-1, -2)).float().mul_(p)
        delta = pdp.sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse.unsqueeze(-1)
        ds = pdp.addcmul_(p, delta, value=-1).mul_(scale).to(dt)
        dq = torch.matmul(ds, k.to(dt)).float()
        dk = torch.matmul(ds.transpose(-1, -2), q.to(dt)).float()
        return dq, dk, dv, None, None, None


def _softmax_lse(q, k, v, allowed, scale, dt):
    """``(out [..., Q, dv] fp32, lse [..., Q] fp32)`` of q ``[..., Q, dk]`` over the allowed keys of
    k ``[..., K, dk]``; a row with no allowed key gives ``out = 0``, ``lse = -inf`` and zero gradients."""
    return _TermAttention.apply(q, k, v, allowed, scale, dt)


def _band(q, k, v, term: Band, scale, dt):
    n = q.shape[2]
    w = term.window
    if w is None or w >= n:  # the band covers everything: plain causal attention
        i = torch.arange(n, device=q.device)
        allowed = i.view(n, 1) >= i.view(1, n)
        if w is not None:
            allowed &= (i.view(n, 1) - i.view(1, n)) < w
        return _softmax_lse(q, k, v, allowed, scale, dt)
    B, H, _, dk = q.shape
    qc, kc, vc = (_pad_to(x, w) for x in (q, k, v))
    C = qc.shape[2] // w
    qc = qc.view(B, H, C, w, dk)
    kc = kc.view(B, H, C, w, dk)
    vc = vc.view(B, H, C, w, v.shape[-1])
    # keys of chunk c: chunk c-1 then chunk c (chunk -1 is zeros and masked out)
    k2 = torch.cat([F.pad(kc, (0, 0, 0, 0, 1, 0))[:, :, :C], kc], dim=3)
    v2 = torch.cat([F.pad(vc, (0, 0, 0, 0, 1, 0))[:, :, :C], vc], dim=3)
    t = torch.arange(w, device=q.device).view(w, 1)  # query offset in its chunk
    u = torch.arange(2 * w, device=q.device).view(1, 2 * w)  # key offset from the previous chunk
    allowed = (u > t) & (u <= t + w)  # i - j = t - u + w in [0, w)
    first = torch.arange(C, device=q.device).view(C, 1, 1) > 0
    allowed = allowed & (first | (u >= w))
    out, lse = _softmax_lse(qc, k2, v2, allowed, scale, dt)
    return out.reshape(B, H, C * w, -1)[:, :, :n], lse.reshape(B, H, C * w)[:, :, :n]


def _block(q, k, v, term: Block, scale, dt):
    B, H, n, dk = q.shape
    l = term.size
    qb, kb, vb = (_pad_to(x, l) for x in (q, k, v))
    C = qb.shape[2] // l
    qb, kb = qb.view(B, H, C, l, dk), kb.view(B, H, C, l, dk)
    vb = vb.view(B, H, C, l, v.shape[-1])
    allowed = torch.ones(l, l, dtype=torch.bool, device=q.device).tril()
    out, lse = _softmax_lse(qb, kb, vb, allowed, scale, dt)
    return out.reshape(B, H, C * l, -1)[:, :, :n], lse.reshape(B, H, C * l)[:, :, :n]


def _stride(q, k, v, term: Stride, scale, dt):
    B, H, n, _ = q.shape
    l = term.size
    R = -(-n // l)

    def transpose(x):  # [B, H, R*l, d] -> [B, H, l, R, d]: residue classes become contiguous runs
        return _pad_to(x, l).view(B, H, R, l, x.shape[-1]).transpose(2, 3)

    r = torch.arange(R, device=q.device)
    gap = -(-term.min_distance // l)  # rows between query and key, at least
    allowed = (r.view(R, 1) - r.view(1, R)) >= max(gap, 0)
    out, lse = _softmax_lse(transpose(q), transpose(k), transpose(v), allowed, scale, dt)
    out = out.transpose(2, 3).reshape(B, H, R * l, -1)[:, :, :n]
    lse = lse.transpose(2, 3).reshape(B, H, R * l)[:, :, :n]
    return out, lse


def _summary(q, k, v, term: Summary, scale, dt):
    B, H, n, dk = q.shape
    l, c = term.size, term.hi - term.lo
    kb, vb = _pad_to(k, l), _pad_to(v, l)
    C = kb.shape[2] // l
    ks = kb.view(B, H, C, l, dk)[:, :, :, term.lo:term.hi].reshape(B, H, C * c, dk)
    vs = vb.view(B, H, C, l, v.shape[-1])[:, :, :, term.lo:term.hi].reshape(B, H, C * c, v.shape[-1])
    i = torch.arange(n, device=q.device).view(n, 1)
    s_idx = torch.arange(C * c, device=q.device).view(1, C * c)
    block, j = s_idx // c, (s_idx // c) * l + term.lo + s_idx % c
    allowed = (block < i // l) if term.earlier_blocks_only else (j <= i)
    return _softmax_lse(q, ks, vs, allowed, scale, dt)


_TERMS = {Band: _band, Block: _block, Stride: _stride, Summary: _summary}


def _merge(parts):
    """Exact combination of disjoint terms from their normalized outputs and log-sum-exps."""
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


def by_head_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: _PatternBase, attend) -> torch.Tensor:
    """``attend(q, k, v, terms) -> [B, h, n, dv]`` run once per group of heads that share a key set
    (per-head summary offsets and the multi-head integration make groups); heads back in order."""
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


def factorized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: _PatternBase,
                         scale: float | None = None) -> torch.Tensor:
    """``q, k [B, H, n, dk]``, ``v [B, H, n, dv]`` -> ``[B, H, n, dv]`` in ``q.dtype``."""
    dt = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()  # no-ops for fp32 inputs
    out = by_head_group(q, k, v, pattern,
                        lambda qs, ks, vs, terms: _merge([_TERMS[type(t)](qs, ks, vs, t, scale, dt) for t in terms]))
    return out.to(dt)
