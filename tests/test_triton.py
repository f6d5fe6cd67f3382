"""The triton backend equals the fp32 reference: output and dq, dk, dv over patterns x parts x
lengths x head dims x dtypes (tolerance rule of docs/design.md §6).

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
the kernels are imported). The interpreter's bf16 ``tl.dot`` is wrong (numpy has no bf16), so bf16
runs only in the GPU tests; fp16 and fp32 run everywhere. ``@pytest.mark.gpu`` tests cover the
realistic sizes, determinism and ``torch.compile``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from attention_cases import (
    assert_close_by_rule,
    lowp_masked_attention,
    outputs_and_grads,
    pattern_grid,
    random_qkv,
)

from sparse_transformer import patterns as P
from sparse_transformer.attention.reference import reference_attention
from sparse_transformer.attention.triton import ops, triton_attention

GRID = pattern_grid()
# the interpreter trips numpy's scalar-conversion deprecation on every program id
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
cpu_interpreter = pytest.mark.skipif(
    not ops.INTERPRET, reason="CPU tests need the Triton interpreter (kernels were imported compiled)"
)


def _check(pattern, q, k, v, do, dtype, fp32_tol=2e-5, deterministic=False):
    got = outputs_and_grads(
        lambda a, b, c: triton_attention(a, b, c, pattern, deterministic=deterministic), q, k, v, do
    )
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = outputs_and_grads(lambda a, b, c: reference_attention(a, b, c, pattern), *ref_in, do.float())
    lowp = None
    if dtype != torch.float32:
        lowp = outputs_and_grads(lambda a, b, c: lowp_masked_attention(a, b, c, pattern), q, k, v, do)
    assert_close_by_rule(got, ref, lowp, dtype=dtype, fp32_tol=fp32_tol)


# ---------------------------------------------------------------------------------------------
# CPU, interpreter
# ---------------------------------------------------------------------------------------------


@cpu_interpreter
@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("n", [5, 37, 300])  # n < l, not a multiple of l, several tiles per residue class
@pytest.mark.parametrize("dk,dv", [(32, 32), (40, 24)])  # power of two; odd and dk != dv
def test_fp32_matches_reference(name, n, dk, dv):
    q, k, v, do = random_qkv(1, 4, n, dk, dv, torch.float32, seed=n * 7 + dk)
    _check(GRID[name], q, k, v, do, torch.float32)


@cpu_interpreter
@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("n,dk,dv", [(37, 32, 32), (64, 64, 64)])
def test_fp16_matches_reference(name, n, dk, dv):
    q, k, v, do = random_qkv(1, 4, n, dk, dv, torch.float16, seed=n + dk)
    _check(GRID[name], q, k, v, do, torch.float16)


@cpu_interpreter
@pytest.mark.parametrize(
    "pattern",
    [
        P.strided(64),
        P.fixed(64, 16, num_verts=2),
        P.multihead(P.fixed(48, 16, 3)),
        P.fixed(64, 16, part="summary"),
        P.local(40),
    ],
    ids=["strided64", "fixed64", "multihead-fixed48", "summary64", "local40"],
)
def test_blocks_larger_than_tiles(pattern):
    """Strides and blocks larger than the 32-row tiles (blocks span tiles, summaries span tiles)."""
    q, k, v, do = random_qkv(1, 4, 300, 64, 64, torch.float32, seed=3)
    _check(pattern, q, k, v, do, torch.float32)


@cpu_interpreter
@pytest.mark.parametrize("short_run_tiles", [0, 1000], ids=["always-split", "one-masked-loop"])
@pytest.mark.parametrize(
    "pattern",
    [P.strided(16), P.fixed(32, 8, num_verts=2), P.local(40), P.dense()],
    ids=["strided16", "fixed32", "local40", "dense"],
)
def test_range_tiles_split_or_one_masked_loop(pattern, short_run_tiles, monkeypatch):
    """Both walks of a range term's tiles (masked head / full middle / masked tail, or one masked
    loop: ops.SHORT_RUN_TILES picks by the span) give the reference."""
    monkeypatch.setattr(ops, "SHORT_RUN_TILES", short_run_tiles)
    q, k, v, do = random_qkv(1, 2, 200, 32, 32, torch.float32, seed=6)
    _check(pattern, q, k, v, do, torch.float32)


@cpu_interpreter
def test_empty_rows_give_exact_zeros():
    pattern = P.fixed(16, 4, part="summary")  # queries 0..11 read nothing
    q, k, v, do = random_qkv(2, 2, 40, 32, 32, torch.float32)
    out = triton_attention(q, k, v, pattern)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[:, :, :12] == 0).all() and (dq[:, :, :12] == 0).all()
    summary = (torch.arange(40) % 16) >= 12
    assert (dk[:, :, ~summary] == 0).all() and (dv[:, :, ~summary] == 0).all()
    assert out[:, :, 12:].abs().min() > 0 and dv[:, :, summary].abs().sum() > 0


@cpu_interpreter
def test_strided_inputs_and_explicit_scale():
    """q/k/v as views of a [B, n, H, d] projection (non-contiguous heads) and a custom scale."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 50, 3, 4, 32, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    pattern = P.strided(8)
    out = triton_attention(q, k, v, pattern, scale=0.3)
    ref = reference_attention(q, k, v, pattern, scale=0.3)
    assert (out - ref).abs().max() < 2e-5


@cpu_interpreter
@pytest.mark.parametrize("pattern", [P.strided(8), P.fixed(8, 2, num_verts=2)], ids=["strided8", "fixed8"])
def test_deterministic_backward_is_bitwise_reproducible(pattern):
    q, k, v, do = random_qkv(1, 2, 70, 32, 32, torch.float32, seed=9)
    runs = [
        torch.autograd.grad(triton_attention(q, k, v, pattern, deterministic=True), (q, k, v), do) for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _grads_both_modes(pattern, q, k, v, do):
    return [
        torch.autograd.grad(triton_attention(q, k, v, pattern, deterministic=det), (q, k, v), do)
        for det in (False, True)
    ]


def _assert_modes_agree(fused, det, tol):
    """dK and dV run the same code in both modes (bitwise equal); dQ differs only in summation
    order: the fused mode adds per-key-tile shares in fp32, the deterministic one sums per query."""
    (dq_f, dk_f, dv_f), (dq_d, dk_d, dv_d) = fused, det
    assert torch.equal(dk_f, dk_d) and torch.equal(dv_f, dv_d)
    err = (dq_f.float() - dq_d.float()).abs().max().item()
    assert err <= tol * (1 + dq_d.float().abs().max().item()), err


@pytest.fixture
def fused_dq(monkeypatch):
    """Turn on the (opt-in) fused-dQ backward for deterministic=False."""
    monkeypatch.setattr(ops, "FUSED_DQ", True)


@cpu_interpreter
@pytest.mark.parametrize("name", list(GRID))
def test_fused_dq_backward_matches_reference(name, fused_dq):
    q, k, v, do = random_qkv(1, 4, 300, 40, 24, torch.float32, seed=13)
    _check(GRID[name], q, k, v, do, torch.float32)


@cpu_interpreter
@pytest.mark.parametrize("name", ["strided-both", "fixed-both", "fixed-summary", "multihead-strided", "local"])
def test_fused_dq_backward_matches_deterministic(name, fused_dq):
    """The fused-dQ (atomic) backward and the atomic-free one agree."""
    q, k, v, do = random_qkv(1, 4, 100, 40, 24, torch.float32, seed=11)
    _assert_modes_agree(*_grads_both_modes(GRID[name], q, k, v, do), tol=2e-6)


@cpu_interpreter
@pytest.mark.parametrize("dk,dv", [(64, 64), (40, 24)])
def test_fused_dq_backward_fp16(dk, dv, fused_dq):
    q, k, v, do = random_qkv(1, 4, 64, dk, dv, torch.float16, seed=12)
    _check(GRID["fixed-both"], q, k, v, do, torch.float16)


@cpu_interpreter
def test_fused_dq_switch_off_gives_the_atomic_free_backward(monkeypatch):
    monkeypatch.setattr(ops, "FUSED_DQ", False)
    q, k, v, do = random_qkv(1, 2, 40, 32, 32, torch.float32, seed=4)
    fused, det = _grads_both_modes(P.strided(8), q, k, v, do)
    for a, b in zip(fused, det):
        assert torch.equal(a, b)


def test_interleaved_pattern_must_be_resolved_per_layer():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="for_layer"):
        triton_attention(q, q, q, P.interleaved(P.strided(4)))


def test_encode_splits_heads_into_progressions():
    spec = ops.encode(P.multihead(P.fixed(8, 2, num_verts=2)), 8)
    groups = ops.decode(spec)
    heads = sorted(g.head0 + i * g.head_step for g in groups for i in range(g.count))
    assert heads == list(range(8))
    # even heads: block only (one natural pass); odd heads: standalone summary, two offsets
    assert sum(g.count for g in groups if g.passes[0].sum_c == 0) == 4
    assert {g.passes[0].sum_lo for g in groups if g.passes[0].sum_c} == {6, 4}
    # strided both: a natural band pass, then the transposed stride pass (offset 1: j = i is the band's)
    (g,) = ops.decode(ops.encode(P.strided(8), 2))
    assert [(p.step, p.window, p.offset) for p in g.passes] == [(1, 8, 0), (8, 0, 1)]


@cpu_interpreter
def test_custom_op_registration_and_no_graph_breaks():
    q, k, v, _ = random_qkv(1, 2, 24, 16, 16, torch.float32)
    spec = ops.encode(P.fixed(8, 2), 2)
    torch.library.opcheck(
        ops.attention_fwd,
        (q, k, v, spec, 0.25, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    fn = torch.compile(lambda a, b, c: triton_attention(a, b, c, P.fixed(8, 2)), backend="eager", fullgraph=True)
    assert torch.allclose(fn(q, k, v), triton_attention(q, k, v, P.fixed(8, 2)))


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes. A covering design over n x l x dtype x head dim (every value of each axis
# at least once), not the full product: each combination compiles its own kernels.
# ---------------------------------------------------------------------------------------------

GPU_CASES = [  # (pattern, n, B, H, dk, dv, dtype, l)
    ("strided", 16384, 1, 1, 64, 64, torch.bfloat16, 128),  # classes of 128: the owned stride term
    ("strided", 9000, 1, 2, 64, 64, torch.bfloat16, 64),  # classes of 141: stride term as dQ + dK/dV passes
    ("strided", 1000, 2, 4, 64, 64, torch.bfloat16, 64),
    ("fixed", 4096, 1, 2, 32, 32, torch.float16, 128),
    ("multihead-fixed", 4096, 1, 4, 128, 128, torch.bfloat16, 256),
    ("fixed-summary", 1000, 1, 2, 64, 32, torch.bfloat16, 64),  # half-size q/k, empty rows
    ("multihead-strided", 1000, 1, 4, 80, 80, torch.float16, 128),  # padded head dim
]


def _gpu_pattern(name, l):
    return {
        "strided": P.strided(l),
        "fixed": P.fixed(l, 32, num_verts=2),
        "dense": P.dense(),
        "strided-stride": P.strided(l, "stride"),
        "fixed-summary": P.fixed(l, 32, num_verts=2, part="summary"),
        "multihead-fixed": P.multihead(P.fixed(l, 32, num_verts=2)),
        "multihead-strided": P.multihead(P.strided(l)),
    }[name]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-n{c[1]}-l{c[7]}-d{c[4]}x{c[5]}-{str(c[6])[6:]}")
def test_gpu_matches_reference(case):
    name, n, B, H, dk, dv, dtype, l = case
    q, k, v, do = random_qkv(B, H, n, dk, dv, dtype, device="cuda", seed=n + dk)
    _check(_gpu_pattern(name, l), q, k, v, do, dtype, fp32_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [P.strided(128), P.fixed(128, 32)], ids=["strided", "fixed"])
def test_gpu_deterministic_grads_are_bitwise_identical(pattern):
    q, k, v, do = random_qkv(2, 4, 4096, 64, 64, torch.bfloat16, device="cuda", seed=1)
    runs = [
        torch.autograd.grad(triton_attention(q, k, v, pattern, deterministic=True), (q, k, v), do) for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name,l", [("strided", 128), ("fixed", 128), ("multihead-strided", 64)])
def test_gpu_fused_and_deterministic_backward_agree(name, l, fused_dq):
    q, k, v, do = random_qkv(2, 4, 4096, 64, 64, torch.bfloat16, device="cuda", seed=3)
    # bf16 dQ: the two summation orders differ by bf16 rounding of the final cast, at most
    _assert_modes_agree(*_grads_both_modes(_gpu_pattern(name, l), q, k, v, do), tol=1e-2)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    pattern = P.fixed(128, 32)
    q, k, v, _ = random_qkv(1, 2, 2048, 64, 64, torch.bfloat16, device="cuda", seed=2)

    def layer(a, b, c):
        return (triton_attention(a * 1.0, b, c, pattern) * 2.0).sum(-1)

    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, k, v)
    got.sum().backward()
    dq = q.grad.clone()
    q.grad = None
    ref = layer(q, k, v)
    ref.sum().backward()
    assert torch.allclose(got.float(), ref.float(), atol=1e-2, rtol=1e-2)
    assert torch.allclose(dq.float(), q.grad.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_gpu_fp32_matches_reference(deterministic, fused_dq):
    """fp32 (tf32x3 dots) at d=64 and a small n, last in the file: fp32 kernels are the slowest to
    compile (an earlier 'ieee' build stalled for minutes), so a slow compile stops nothing else."""
    q, k, v, do = random_qkv(1, 2, 1024, 64, 64, torch.float32, device="cuda", seed=8)
    _check(P.fixed(128, 32, num_verts=2), q, k, v, do, torch.float32, fp32_tol=1e-4, deterministic=deterministic)
