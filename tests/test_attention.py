"""The factorized and reference backends against fp64 truth: output and every gradient, over patterns
x parts x lengths x head dims x dtypes (the tolerance rule of docs/design.md §6)."""

import pytest
import torch
from attention_cases import assert_matches_torch, pattern_grid, random_qkv

from sparse_transformer import patterns as P
from sparse_transformer import sparse_attention
from sparse_transformer.attention.reference import reference_attention

GRID = pattern_grid()


@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("n", [5, 24, 37])  # n < l, a multiple of l, not a multiple
@pytest.mark.parametrize("dk,dv", [(32, 32), (64, 64), (17, 17), (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factorized_matches_reference(name, n, dk, dv, dtype):
    pattern = GRID[name]
    q, k, v, do = random_qkv(2, 4, n, dk, dv, dtype, seed=n * 1000 + dk)
    assert_matches_torch(lambda a, b, c: sparse_attention(a, b, c, pattern, backend="factorized"), pattern, q, k, v, do)


@pytest.mark.parametrize("name", list(GRID))
def test_reference_backend_obeys_the_rule(name):
    """The oracle itself (fp32 inside) in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, do = random_qkv(2, 4, 37, 32, 16, dtype, seed=7)
        assert_matches_torch(lambda a, b, c: reference_attention(a, b, c, GRID[name]), GRID[name], q, k, v, do)


def test_empty_rows_give_zero_output_and_gradients():
    pattern = P.fixed(8, 2, part="summary")  # queries 0..5 read nothing
    q, k, v, do = random_qkv(1, 2, 20, 16, 16, torch.float32)
    for backend in ("reference", "factorized"):
        out = sparse_attention(q, k, v, pattern, backend=backend)
        dq, dk, _dv = torch.autograd.grad(out, (q, k, v), do)
        assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert (out[:, :, :6] == 0).all() and (dq[:, :, :6] == 0).all()
        assert out[:, :, 6:].abs().sum() > 0


def test_reference_is_dense_causal_attention_for_dense_pattern():
    q, k, v, _ = random_qkv(2, 3, 33, 16, 16, torch.float32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference_attention(q, k, v, P.dense()), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_attention(q, k, v, P.dense()), want, atol=1e-5, rtol=1e-5)


def test_factorized_memory_is_subquadratic():
    """At n = 4,096 (l = 64) no intermediate of the strided path is n x n: the largest tensor the
    forward pass allocates is far below the 64 MiB an fp32 n x n score matrix would take."""
    n, l = 4096, 64
    q, k, v, _ = random_qkv(1, 1, n, 32, 32, torch.float32)
    biggest = 0

    class Track(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                biggest = max(biggest, out.numel())
            return out

    with Track():
        sparse_attention(q, k, v, P.strided(l), backend="factorized")
    assert biggest <= 4 * n * l, f"largest intermediate has {biggest} elements; n*n = {n * n}"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q, k, v: sparse_attention(q, k[:, :, :5], v, P.strided(4)), "same shape"),
        (lambda q, k, v: sparse_attention(q, k, v[:, :1], P.strided(4)), "v must match"),
        (lambda q, k, v: sparse_attention(q[0], k, v, P.strided(4)), "4-d tensor"),
        (lambda q, k, v: sparse_attention(q, k, v, P.strided(4), backend="magic"), "unknown backend"),
        (lambda q, k, v: sparse_attention(q, k, v, P.strided(4), backend="triton"), "needs CUDA"),
        (lambda q, k, v: sparse_attention(q, k, v, "strided"), "pattern must come from"),
        (lambda q, k, v: sparse_attention(q, k, v, P.strided(4), backend="sdpa"), "only the dense"),
    ],
)
def test_bad_input_is_one_clear_value_error(call, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, triton takes CPU tensors (test_triton.py)
    q, k, v, _ = random_qkv(1, 2, 8, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


@pytest.mark.parametrize("backend", ["reference", "factorized"])
@pytest.mark.parametrize("qk_dim", [None, 16])  # thirds; half-size q and k (paper §5.1)
def test_qkvpacked_is_sparse_attention_on_the_projection_s_heads(backend, qk_dim):
    """``sparse_attention_qkvpacked`` reads q's heads, then k's, then v's from one ``[B, n, W]``
    projection and returns the heads side by side, ``[B, n, H·dv]``; gradients reach the projection."""
    from sparse_transformer import sparse_attention_qkvpacked

    B, n, H, dv = 2, 37, 2, 16
    width = 2 * (qk_dim or H * dv) + H * dv
    qkv = torch.randn(B, n, width, generator=torch.Generator().manual_seed(4), requires_grad=True)
    pattern = P.fixed(8, 2)
    out = sparse_attention_qkvpacked(qkv, H, pattern, qk_dim, backend=backend)
    d = (qk_dim or H * dv) // H
    q = qkv[..., : H * d].reshape(B, n, H, d).transpose(1, 2)
    k = qkv[..., H * d : 2 * H * d].reshape(B, n, H, d).transpose(1, 2)
    v = qkv[..., 2 * H * d :].reshape(B, n, H, dv).transpose(1, 2)
    want = sparse_attention(q, k, v, pattern, backend=backend).transpose(1, 2).reshape(B, n, H * dv)
    assert out.shape == (B, n, H * dv)
    torch.testing.assert_close(out, want)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (grad_want,) = torch.autograd.grad(want.square().sum(), qkv)
    torch.testing.assert_close(grad, grad_want)


@pytest.mark.parametrize(
    "shape, n_heads, qk_dim, message",
    [
        ((2, 8, 4, 6), 2, None, "qkv must be a 3-d tensor"),
        ((2, 8, 50), 2, None, "not three equal parts; pass qk_dim"),
        ((2, 8, 48), 5, None, "does not split into 5 heads"),
        ((2, 8, 48), 2, 24, "does not split into 2 heads"),  # nothing left for v
        ((2, 8, 48), True, None, "n_heads=True must be an integer"),
        ((2, 8, 48), 2, 16.0, "qk_dim=16.0 must be an integer"),
    ],
)
def test_qkvpacked_bad_shapes_are_one_clear_error(shape, n_heads, qk_dim, message):
    from sparse_transformer import sparse_attention_qkvpacked

    with pytest.raises(ValueError, match=message):
        sparse_attention_qkvpacked(torch.randn(shape), n_heads, P.strided(4), qk_dim)


def test_qkvpacked_takes_numpy_integer_counts():
    import numpy as np

    from sparse_transformer import sparse_attention_qkvpacked

    qkv = torch.randn(1, 8, 48)
    want = sparse_attention_qkvpacked(qkv, 2, P.strided(4))
    torch.testing.assert_close(sparse_attention_qkvpacked(qkv, np.int64(2), P.strided(4), np.int64(16)), want)
