"""The flex backend (composed FlexAttention) against the fp32 reference.

Forward and all gradients run on CUDA only (FlexAttention has no CPU backward); the forward index
arithmetic of every term is also checked on CPU through Flex's eager path.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse_transformer import patterns as P
from sparse_transformer.attention import sparse_attention
from sparse_transformer.attention.flex import flex_attention_sparse
from sparse_transformer.attention.reference import reference_attention

PATTERNS = [
    P.dense(),
    P.local(64),
    P.strided(64),
    P.strided(64, "local"),
    P.strided(64, "stride"),
    P.fixed(64, 16),
    P.fixed(64, 16, part="block"),
    P.fixed(64, 16, part="summary"),
    P.fixed(64, 16, num_verts=2),
    P.multihead(P.strided(64)),
    P.multihead(P.fixed(64, 16, num_verts=2)),
]
# patterns with no empty query row: SDPA's own low-precision run (the bf16 yardstick) needs one key per row
NO_EMPTY_ROWS = [p for p in PATTERNS if "summary" not in p.describe()]

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _inputs(shape, dtype, device, dv=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(shape, generator=g) for _ in range(2))
    v = torch.randn(*shape[:3], dv or shape[3], generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("n", [200, 256])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_forward_matches_reference_cpu(pattern, n):
    q, k, v = (t.detach() for t in _inputs((1, 4, n, 16), torch.float64, "cpu"))
    out = flex_attention_sparse(q, k, v, pattern)
    ref = reference_attention(q, k, v, pattern)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


def test_dispatcher_refuses_cpu():
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="needs CUDA"):
        sparse_attention(q, q, q, P.strided(4), backend="flex")


@gpu
@needs_cuda
@pytest.mark.parametrize("n,d,dv", [(1000, 64, 64), (2048, 64, 64), (1536, 32, 64)])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_fp32_forward_and_gradients(pattern, n, d, dv):
    q, k, v = _inputs((2, 4, n, d), torch.float32, "cuda", dv)
    grad = torch.randn(2, 4, n, dv, device="cuda")
    out = sparse_attention(q, k, v, pattern, backend="flex")
    ref = reference_attention(q, k, v, pattern)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-3
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-3, name


@gpu
@needs_cuda
@pytest.mark.parametrize("pattern", NO_EMPTY_ROWS, ids=lambda p: p.describe())
def test_bf16_error_at_most_twice_pytorch(pattern):
    """bf16: the error against the fp32 reference is at most 2x that of PyTorch's own bf16 SDPA with
    the pattern's mask (plus a small floor), for the output and every gradient."""
    n = 1024
    q, k, v = _inputs((2, 4, n, 64), torch.bfloat16, "cuda")
    grad = torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32, pattern)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
    mask = torch.stack([pattern.mask(n, h) for h in range(4)]).cuda()
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), grad)
    out = sparse_attention(q, k, v, pattern, backend="flex")
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert out.dtype == torch.bfloat16
    for name, mine, theirs, exact in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (torch_out, *torch_grads), (ref, *ref_grads)
    ):
        assert _rel(mine, exact) <= 2 * _rel(theirs, exact) + 1e-3, name
