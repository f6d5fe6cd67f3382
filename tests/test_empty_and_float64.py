"""Empty inputs and float64.

* A batch of 0, 0 heads or ``n = 0`` gives an empty output of the right shape on every backend
  (as ``F.scaled_dot_product_attention`` does), with empty gradients of the inputs' shapes; the
  model takes an empty batch or sequence too.
* ``reference`` and ``factorized`` compute float64 inputs in float64: ``torch.autograd.gradcheck``
  passes for the strided, fixed (with per-head summary offsets), local and multihead/interleaved
  patterns.

Without CUDA the triton kernels run under Triton's CPU interpreter (set up as tests/test_triton.py
does); FlexAttention has no CPU backward, so flex is checked on CPU for its forward only (and,
for empty inputs, its gradients: no Flex call is made).
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparse_transformer import patterns as P
from sparse_transformer import sparse_attention
from sparse_transformer.attention.factorized import factorized_attention
from sparse_transformer.attention.flex import flex_attention_sparse
from sparse_transformer.attention.reference import reference_attention
from sparse_transformer.config import ModelConfig
from sparse_transformer.model import SparseTransformer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PATTERNS = {
    "dense": P.dense(),
    "local": P.local(4),
    "strided": P.strided(4),
    "fixed-verts": P.fixed(4, 1, num_verts=2),
    "fixed-summary": P.fixed(4, 2, part="summary"),
    "multihead-fixed": P.multihead(P.fixed(4, 1, num_verts=2)),
}
SHAPES = {"batch0": (0, 2, 8), "heads0": (1, 0, 8), "n0": (1, 2, 0), "all0": (0, 0, 0)}


def _triton():
    pytest.importorskip("triton")
    from sparse_transformer.attention.triton import ops, triton_attention

    if not torch.cuda.is_available() and not ops.INTERPRET:
        pytest.skip("kernels were imported compiled without a GPU; the CPU check needs the Triton interpreter")
    return triton_attention


def _backend(name):
    """``(attention function, whether its gradients are checked)`` for a backend on CPU."""
    if name == "reference":
        return reference_attention, True
    if name == "factorized":
        return factorized_attention, True
    if name == "flex":
        return flex_attention_sparse, True  # empty: no Flex call, so the CPU has a backward too
    if name == "triton":
        return _triton(), True
    if name == "dispatch-auto":
        return (lambda q, k, v, p: sparse_attention(q, k, v, p)), True
    raise AssertionError(name)


def _empty_qkv(B, H, n, dk=4, dv=3, dtype=torch.float32):
    mk = lambda d: torch.randn(B, H, n, d, dtype=dtype, requires_grad=True)
    return mk(dk), mk(dk), mk(dv)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("backend", ["reference", "factorized", "flex", "triton", "dispatch-auto"])
def test_empty_input_gives_empty_output_and_gradients(backend, pattern, shape):
    fn, _ = _backend(backend)
    B, H, n = SHAPES[shape]
    q, k, v = _empty_qkv(B, H, n)
    out = fn(q, k, v, PATTERNS[pattern])
    assert out.shape == (B, H, n, 3) and out.dtype == q.dtype
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g is not None and g.shape == t.shape


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_sdpa_backend_matches_torch_sdpa_on_empty_input(shape):
    B, H, n = SHAPES[shape]
    q, k, v = _empty_qkv(B, H, n, dk=4, dv=4)
    out = sparse_attention(q, k, v, P.dense(), backend="sdpa")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == want.shape == (B, H, n, 4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


@pytest.mark.parametrize("backend", ["reference", "factorized", "flex", "triton"])
def test_empty_input_still_refuses_an_unresolved_interleaved_pattern(backend):
    fn, _ = _backend(backend)
    q, k, v = _empty_qkv(1, 2, 0)
    with pytest.raises(ValueError, match="for_layer"):
        fn(q, k, v, P.interleaved(P.strided(4)))


def test_dispatcher_checks_still_apply_to_empty_inputs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, triton takes CPU tensors
    q, k, v = _empty_qkv(0, 2, 8)
    with pytest.raises(ValueError, match="needs CUDA"):
        sparse_attention(q, k, v, P.strided(4), backend="triton")
    with pytest.raises(ValueError, match="same shape"):
        sparse_attention(q, k[:, :, :3], v, P.strided(4))


def _tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2, n_ctx=16, pattern="fixed", stride=4, c=1, backend="factorized")
    model = SparseTransformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # W_out starts at zero; make the logits depend on x
    return model


@pytest.mark.parametrize("B,n", [(0, 8), (2, 0), (0, 0)])
def test_model_takes_an_empty_batch_or_sequence(B, n):
    model = _tiny_model()
    x = torch.randint(0, 256, (B, n))
    logits = model(x)
    assert logits.shape == (B, n, 256)
    logits.sum().backward()  # every parameter gets a (zero) gradient, no error
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.all(p.grad == 0) for p in model.parameters())


def test_model_on_nonempty_input_is_unchanged_by_the_empty_path():
    """The n = 0 slice of the start embedding must not shift positions of a real sequence."""
    model = _tiny_model()
    x = torch.randint(0, 256, (2, 9))
    full = model(x)
    assert torch.allclose(model(x[:, :5]), full[:, :5], atol=1e-6)
    assert torch.allclose(model(x[:, :1]), full[:, :1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# float64
# ---------------------------------------------------------------------------------------------

GRADCHECK_PATTERNS = {
    "strided": P.strided(3),
    "strided-stride": P.strided(3, "stride"),
    "fixed-summary-offsets": P.fixed(4, 1, num_verts=2),
    "fixed-summary-part": P.fixed(4, 2, part="summary"),  # with empty rows
    "local": P.local(3),
    "multihead-strided": P.multihead(P.strided(3)),
    "multihead-fixed": P.multihead(P.fixed(4, 1, num_verts=2)),
    "interleaved-fixed-layer1": P.interleaved(P.fixed(4, 1)).for_layer(1),
}


def _f64(B=1, H=4, n=7, dk=3, dv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (dk, dk, dv)]


@pytest.mark.parametrize("backend", ["reference", "factorized"])
@pytest.mark.parametrize("name", list(GRADCHECK_PATTERNS), ids=list(GRADCHECK_PATTERNS))
def test_float64_gradcheck(backend, name):
    pattern = GRADCHECK_PATTERNS[name]
    fn = lambda q, k, v: sparse_attention(q, k, v, pattern, backend=backend)
    q, k, v = _f64()
    assert fn(q, k, v).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("name", list(GRADCHECK_PATTERNS), ids=list(GRADCHECK_PATTERNS))
def test_float64_factorized_equals_reference_to_float64_precision(name):
    """Both compute in float64, so they agree far beyond fp32's ~1e-7 (an fp32 step anywhere fails)."""
    pattern = GRADCHECK_PATTERNS[name]
    q, k, v = _f64(B=2, n=13, dk=5, dv=4, seed=1)
    do = torch.randn(2, 4, 13, 4, dtype=torch.float64)
    got = [sparse_attention(q, k, v, pattern, backend="factorized")]
    got += torch.autograd.grad(got[0], (q, k, v), do)
    ref = [reference_attention(q, k, v, pattern)]
    ref += torch.autograd.grad(ref[0], (q, k, v), do)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        assert (a - b).abs().max().item() < 1e-12
