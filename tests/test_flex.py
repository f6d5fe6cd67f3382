"""The flex backend (composed FlexAttention) against fp64 truth (the tolerance rule of docs/design.md §6).

Forward and all gradients run on CUDA only (FlexAttention has no CPU backward); the forward index
arithmetic of every term is also checked on CPU through Flex's eager path.
"""

import pytest
import torch
from attention_cases import assert_matches_torch, pattern_grid

from sparse_transformer import patterns as P
from sparse_transformer.attention import sparse_attention
from sparse_transformer.attention.flex import flex_attention_sparse

# the grid at l = 64, c = 16, and fixed with one summary offset
PATTERNS = [*pattern_grid(64, 16).values(), P.fixed(64, 16), P.fixed(64, 16, part="summary")]

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(shape, dtype, device, dv=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(shape, generator=g) for _ in range(2))
    v = torch.randn(*shape[:3], dv or shape[3], generator=g)
    grad = torch.randn(*shape[:3], dv or shape[3], generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)] + [grad.to(device, dtype)]


@pytest.mark.parametrize("n", [200, 256])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_forward_matches_reference_cpu(pattern, n):
    q, k, v, _ = (t.detach() for t in _inputs((1, 4, n, 16), torch.float32, "cpu"))
    assert flex_attention_sparse(q, k, v, pattern).shape == (1, 4, n, 16)
    assert_matches_torch(lambda a, b, c: flex_attention_sparse(a, b, c, pattern), pattern, q, k, v)


def test_dispatcher_refuses_cpu():
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="needs CUDA"):
        sparse_attention(q, q, q, P.strided(4), backend="flex")


@gpu
@needs_cuda
@pytest.mark.parametrize("n,d,dv", [(1000, 64, 64), (2048, 64, 64), (1536, 32, 64)])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_fp32_forward_and_gradients(pattern, n, d, dv):
    q, k, v, grad = _inputs((2, 4, n, d), torch.float32, "cuda", dv)
    out = sparse_attention(q, k, v, pattern, backend="flex")
    assert out.dtype == torch.float32
    # Flex's fp32 dots may run as TF32: a floor of 1e-3 of the largest value, the former rule's bound
    assert_matches_torch(
        lambda a, b, c: sparse_attention(a, b, c, pattern, backend="flex"), pattern, q, k, v, grad, atol_rel=1e-3
    )


@gpu
@needs_cuda
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_bf16_error_at_most_twice_pytorch(pattern):
    """bf16: the error against fp64 is at most 2x that of PyTorch's own bf16 computation with the
    pattern's mask (plus one unit of bf16), for the output and every gradient."""
    q, k, v, grad = _inputs((2, 4, 1024, 64), torch.bfloat16, "cuda")
    assert sparse_attention(q, k, v, pattern, backend="flex").dtype == torch.bfloat16
    assert_matches_torch(lambda a, b, c: sparse_attention(a, b, c, pattern, backend="flex"), pattern, q, k, v, grad)
