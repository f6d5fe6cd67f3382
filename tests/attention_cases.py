"""Shared helpers for backend tests: the pattern grid and the one tolerance rule of docs/design.md §6."""

import torch

from sparse_transformer import patterns as P

L = 8  # stride used by the small test grid


def pattern_grid(l: int = L, c: int = 2):
    """Every pattern, part and integration at stride ``l`` (fixed: ``c`` summary cells; the
    interleaved one ``c + 1``), keyed by ids for pytest."""
    return {
        "dense": P.dense(),
        "local": P.local(l),
        "strided-both": P.strided(l),
        "strided-local": P.strided(l, "local"),
        "strided-stride": P.strided(l, "stride"),
        "fixed-both": P.fixed(l, c, num_verts=2),
        "fixed-block": P.fixed(l, c, part="block"),
        "fixed-summary": P.fixed(l, c, num_verts=2, part="summary"),
        "multihead-strided": P.multihead(P.strided(l)),
        "multihead-fixed": P.multihead(P.fixed(l, c, num_verts=2)),
        "interleaved-fixed-layer1": P.interleaved(P.fixed(l, c + 1)).for_layer(1),
    }


def random_qkv(B, H, n, dk, dv, dtype, device="cpu", seed=0):
    """q, k ``[B, H, n, dk]``, v ``[B, H, n, dv]`` (requiring grad) and an output gradient ``[B, H, n, dv]``."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda d: torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return mk(dk), mk(dk), mk(dv), torch.randn(B, H, n, dv, generator=g).to(device=device, dtype=dtype)


def torch_attention(q, k, v, pattern, scale=None):
    """PyTorch's own computation of the pattern: dense masked softmax entirely in ``q.dtype``
    (empty rows give 0). In fp64 it is the truth; in the input dtype, the yardstick."""
    _, H, n, dk = q.shape
    mask = torch.stack([pattern.mask(n, head=h) for h in range(H)]).to(q.device)
    s = (q @ k.transpose(-1, -2)) * (dk**-0.5 if scale is None else scale)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def outputs_and_grads(fn, q, k, v, do=None):
    """``[out, dq, dk, dv]`` of ``fn(q, k, v)`` in fp64 for measuring (``[out]`` when ``do`` is None)."""
    out = fn(q, k, v)
    if do is None:
        return [out.detach().double()]
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [out.detach().double()] + [g.double() for g in grads]


def assert_matches_torch(fn, pattern, q, k, v, do=None, scale=None, atol_rel=None):
    """The tolerance rule of every backend test (docs/design.md §6, as FlashAttention's tests):

    for the output and each gradient, ``max |fn - exact| <= 2 * max |torch - exact| + atol_rel *
    max(max |exact|, 1)``, where ``exact`` is :func:`torch_attention` in fp64 and ``torch`` is the same in
    the inputs' dtype: a backend may be at most twice as wrong as PyTorch's own computation in the
    same precision. The floor is taken at the largest exact value, or at 1 (the scale of the unit
    normal inputs) where the result is smaller: a gradient that is exactly 0 (a row with one key)
    comes out of any computation that does not cancel exactly as a few roundings of terms of size 1.
    ``atol_rel`` defaults to one unit of a 16-bit dtype (the rounding of the result
    itself; on the small tensors of CPU tests a single element can otherwise decide the test) and to
    16 units of fp32, where the yardstick's error is itself a few units and a backend's few extra
    rounding steps (the log-sum-exp merge of terms, tiled accumulation) count as much (the
    factorized backend needs up to 3). ``do=None`` checks the forward only.
    """
    exact_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    exact = outputs_and_grads(
        lambda a, b, c: torch_attention(a, b, c, pattern, scale), *exact_in, None if do is None else do.double()
    )
    same = outputs_and_grads(lambda a, b, c: torch_attention(a, b, c, pattern, scale), q, k, v, do)
    got = outputs_and_grads(fn, q, k, v, do)
    if atol_rel is None:
        atol_rel = torch.finfo(q.dtype).eps * (16 if q.dtype == torch.float32 else 1)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, exact, same):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err, base, size = ((x - e).abs().max().item() for x in (a, t, torch.zeros_like(e)))
        size = max(size, 1.0)
        assert err <= 2 * base + atol_rel * size, (
            f"{name}: error {err:.3g} > 2 x PyTorch's {q.dtype} error {base:.3g} + {atol_rel:.2g} x {size:.3g}"
        )
