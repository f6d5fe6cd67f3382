"""Shared helpers for backend tests: the pattern grid and the tolerance rule of docs/design.md §6."""

import torch

from sparse_transformer import patterns as P

L = 8  # stride used by the small test grid


def pattern_grid():
    """Every pattern, part and integration, at stride L (ids for pytest)."""
    return {
        "dense": P.dense(),
        "local": P.local(L),
        "strided-both": P.strided(L),
        "strided-local": P.strided(L, "local"),
        "strided-stride": P.strided(L, "stride"),
        "fixed-both": P.fixed(L, 2, num_verts=2),
        "fixed-block": P.fixed(L, 2, part="block"),
        "fixed-summary": P.fixed(L, 2, num_verts=2, part="summary"),
        "multihead-strided": P.multihead(P.strided(L)),
        "multihead-fixed": P.multihead(P.fixed(L, 2, num_verts=2)),
        "interleaved-fixed-layer1": P.interleaved(P.fixed(L, 3)).for_layer(1),
    }


def random_qkv(B, H, n, dk, dv, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda d: torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return mk(dk), mk(dk), mk(dv), torch.randn(B, H, n, dv, generator=g).to(device=device, dtype=dtype)


def lowp_masked_attention(q, k, v, pattern):
    """PyTorch's own low-precision computation: dense masked softmax entirely in q.dtype."""
    B, H, n, dk = q.shape
    mask = torch.stack([pattern.mask(n, head=h) for h in range(H)]).to(q.device)
    s = (q @ k.transpose(-1, -2)) * dk**-0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return p @ v


def outputs_and_grads(fn, q, k, v, do):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [out.detach().float()] + [g.float() for g in grads]


def assert_close_by_rule(got, ref, lowp=None, names=("out", "dq", "dk", "dv"), fp32_tol=2e-5, dtype=torch.bfloat16):
    """fp32: max abs error <= fp32_tol * (1 + max|ref|). Low precision: max abs error <= 2 x that of
    PyTorch's own low-precision computation (``lowp``) of the same thing, plus one unit of the
    dtype's precision at the largest reference value (the rounding of the result itself; on the
    small tensors of CPU tests a single element can otherwise decide the test)."""
    for name, a, r, *lp in zip(names, got, ref, *([lowp] if lowp is not None else [])):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a - r).abs().max().item()
        scale = r.abs().max().item()
        if lowp is None:
            assert err <= fp32_tol * (1 + scale), f"{name}: max error {err:.3g} vs |ref| {scale:.3g}"
        else:
            base = (lp[0] - r).abs().max().item()
            assert err <= 2 * base + torch.finfo(dtype).eps * scale, (
                f"{name}: error {err:.3g} > 2 x torch low-precision error {base:.3g}"
            )
