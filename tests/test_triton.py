"""The triton backend equals the fp32 reference: output and dq, dk, dv over patterns x parts x
lengths x head dims x dtypes (tolerance rule of docs/design.md §6).

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
the kernels are imported). The interpreter's bf16 ``tl.dot`` is wrong (numpy has no bf16), so bf16
runs only in the GPU tests; fp16 and fp32 run everywhere. ``@pytest.mark.gpu`` tests cover the
realistic sizes, determinism and ``torch.compile``. Tile choice (``tile_config``, ``Tuning``) and the
launch plans are checked without running a kernel.
"""

import contextlib
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from attention_cases import assert_matches_torch, pattern_grid, random_qkv

from sparse_transformer import patterns as P
from sparse_transformer import sparse_attention
from sparse_transformer.attention.triton import Tile, Tuning, ops, tile_config, tiles, triton_attention

GRID = pattern_grid()
# the interpreter trips numpy's scalar-conversion deprecation on every program id
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
cpu_interpreter = pytest.mark.skipif(
    not ops.INTERPRET, reason="CPU tests need the Triton interpreter (kernels were imported compiled)"
)


def _check(pattern, q, k, v, do, atol_rel=None, tuning=None):
    assert_matches_torch(
        lambda a, b, c: triton_attention(a, b, c, pattern, tuning=tuning),
        pattern,
        q,
        k,
        v,
        do,
        atol_rel=atol_rel,
    )


# ---------------------------------------------------------------------------------------------
# CPU, interpreter
# ---------------------------------------------------------------------------------------------


def _heads(pattern) -> int:
    """4 heads where the pattern's heads differ (2 in each head group: a group steps over the heads),
    else 2: a pattern that treats every head alike runs them as one group of consecutive heads, the
    same launches for 2 heads as for 4 (and half the interpreter's time)."""
    return 4 if len(pattern.head_groups(4)) > 1 else 2


@cpu_interpreter
@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("n", [5, 37, 300])  # n < l, not a multiple of l, several tiles per residue class
@pytest.mark.parametrize("dk,dv", [(32, 32), (40, 24)])  # power of two; odd and dk != dv
def test_fp32_matches_reference(name, n, dk, dv):
    q, k, v, do = random_qkv(1, _heads(GRID[name]), n, dk, dv, torch.float32, seed=n * 7 + dk)
    _check(GRID[name], q, k, v, do)


@cpu_interpreter
@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("n,dk,dv", [(37, 32, 32), (64, 64, 64)])
def test_fp16_matches_reference(name, n, dk, dv):
    q, k, v, do = random_qkv(1, 4, n, dk, dv, torch.float16, seed=n + dk)
    _check(GRID[name], q, k, v, do)


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
    q, k, v, do = random_qkv(1, _heads(pattern), 300, 64, 64, torch.float32, seed=3)
    _check(pattern, q, k, v, do)


@cpu_interpreter
@pytest.mark.parametrize("short_run_tiles", [0, 1000], ids=["always-split", "one-masked-loop"])
@pytest.mark.parametrize(
    "pattern",
    [P.strided(16), P.fixed(32, 8, num_verts=2), P.local(40), P.dense()],
    ids=["strided16", "fixed32", "local40", "dense"],
)
def test_range_tiles_split_or_one_masked_loop(pattern, short_run_tiles):
    """Both walks of a range term's tiles (masked head / full middle / masked tail, or one masked
    loop: ``short_run_tiles`` picks by the span) give the reference."""
    q, k, v, do = random_qkv(1, 2, 200, 32, 32, torch.float32, seed=6)
    _check(pattern, q, k, v, do, tuning=Tuning(short_run_tiles=short_run_tiles))


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
    assert_matches_torch(lambda a, b, c: triton_attention(a, b, c, pattern, scale=0.3), pattern, q, k, v, scale=0.3)


@cpu_interpreter
@pytest.mark.parametrize("scale", [-0.4, 0.0])
def test_non_positive_scale_takes_the_unfused_forward(scale):
    """The forward folds a positive scale into one multiply-add per score (its row maximum is the
    scaled maximum of the raw scores); a negative or zero scale must take the plain path and still
    match the reference. Scores of a few hundred make the folded path overflow exp2 at a negative
    scale (its "maximum" is then the minimum), so this fails if the plan folded it."""
    assert ops.call_constexprs("attn_fwd", scale) == {"FOLD": False}
    assert ops.call_constexprs("attn_fwd", 0.3) == {"FOLD": True} and ops.call_constexprs("attn_bwd_dq", 0.3) == {}
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) * w for w in (6.0, 6.0, 1.0))
    pattern = P.fixed(8, 2)
    assert_matches_torch(lambda a, b, c: triton_attention(a, b, c, pattern, scale=scale), pattern, q, k, v, scale=scale)


@cpu_interpreter
@pytest.mark.parametrize("pattern", [P.strided(8), P.fixed(8, 2, num_verts=2)], ids=["strided8", "fixed8"])
def test_backward_is_bitwise_reproducible(pattern):
    """Right (the rule) and the same bits on a second run (the backward has no atomics)."""
    q, k, v, do = random_qkv(1, 2, 70, 32, 32, torch.float32, seed=9)
    _check(pattern, q, k, v, do)
    runs = [torch.autograd.grad(triton_attention(q, k, v, pattern), (q, k, v), do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# CPU tensors through sparse_attention(..., backend="triton") under the interpreter
# ---------------------------------------------------------------------------------------------


def _reference_comparison(pattern, q, k, v, do, **kwargs):
    """max |triton - reference| of the output and of dq, dk, dv, each over max(1, max |reference|):
    both backends through ``sparse_attention``, on the same fp32 CPU tensors."""
    errors = []
    results = []
    for backend, kw in (("triton", kwargs), ("reference", {})):
        out = sparse_attention(q, k, v, pattern, backend=backend, **kw)
        results.append([out, *torch.autograd.grad(out, (q, k, v), do)])
    for got, ref in zip(*results):
        assert got.shape == ref.shape and torch.isfinite(got).all()
        errors.append((got - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
    return errors


@cpu_interpreter
@pytest.mark.parametrize("name", ["strided-both", "fixed-both", "fixed-summary", "multihead-fixed", "local", "dense"])
@pytest.mark.parametrize("n,dk,dv", [(37, 16, 16), (100, 40, 24)])
def test_sparse_attention_triton_on_cpu_matches_reference_backend(name, n, dk, dv, monkeypatch):
    """``sparse_attention(..., backend="triton")`` takes CPU tensors when TRITON_INTERPRET=1 is set;
    the output and every gradient equal the fp32 ``reference`` backend's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, do = random_qkv(2, _heads(GRID[name]), n, dk, dv, torch.float32, seed=n + dk)
    errors = _reference_comparison(GRID[name], q, k, v, do)
    assert max(errors) < 2e-5, dict(zip(("out", "dq", "dk", "dv"), errors))


def test_cpu_tensors_without_the_interpreter_are_refused_naming_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = random_qkv(1, 2, 8, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors; set TRITON_INTERPRET=1.*backend='factorized'"):
        sparse_attention(q, k, v, P.strided(4), backend="triton")


def test_kernels_compiled_before_the_variable_was_set_are_named(tmp_path):
    """TRITON_INTERPRET=1 set after the kernels were imported compiled: triton_attention says so (a
    fresh process, since this one's kernels may already be interpreted)."""
    import subprocess
    import sys

    code = """
import os, torch
from sparse_transformer import patterns as P
from sparse_transformer.attention.triton import ops, triton_attention
assert not ops.INTERPRET
q = torch.randn(1, 1, 8, 16)
for env in ("0", "1"):
    os.environ["TRITON_INTERPRET"] = env
    try:
        triton_attention(q, q, q, P.strided(4))
    except ValueError as e:
        print(e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 2, res.stdout + res.stderr
    assert "needs CUDA tensors; set TRITON_INTERPRET=1" in lines[0]
    assert "must be set before sparse_transformer.attention.triton is first imported" in lines[1]


def test_tuning_is_for_the_triton_backend_only():
    q, k, v, _ = random_qkv(1, 2, 8, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="tuning sets the triton backend's tiles"):
        sparse_attention(q, k, v, P.strided(4), backend="factorized", tuning=Tuning(short_run_tiles=0))


# ---------------------------------------------------------------------------------------------
# Tile choice: a pure function over frozen tables, and the per-call override
# ---------------------------------------------------------------------------------------------


def test_tile_config_reads_the_tables():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert tile_config("fwd", 64, bf16) == Tile(64, 64, 4, 3, 128)
    assert tile_config("dkdv_stride", 64, torch.float16) == Tile(32, 64, 4, 3, 168)
    # head dims 16 and 32 take the 64 tiles; 80 pads to 128; above 128 takes 128's
    assert (
        tile_config("dq", 32, bf16) == tile_config("dq", 16, bf16) == tile_config("dq", 64, bf16) == Tile(64, 32, 4, 3)
    )
    assert tile_config("dq", 80, bf16) == tile_config("dq", 256, bf16) == Tile(128, 64, 8, 2)
    # fp32: a role without its own entry takes its kernel's
    assert tile_config("dq_stride", 64, fp32) == tile_config("dq", 64, fp32) == Tile(64, 32, 4, 2)
    assert tile_config("dkdv_owned", 128, fp32) == Tile(32, 64, 4, 2)
    assert tile_config("fwd_summary", 64, bf16, interpreter=True) == tiles.INTERPRETER_TILE
    for role in tiles.ROLES:
        for d in (16, 32, 64, 80, 128):
            for dtype in (torch.float16, bf16, fp32):
                assert isinstance(tile_config(role, d, dtype), Tile)
    with pytest.raises(ValueError, match="unknown tile role"):
        tile_config("dkdv_fused", 64, bf16)


def test_tile_tables_cannot_be_rewritten():
    with pytest.raises(TypeError):
        tiles.TILES["fwd"] = tiles.TILES["dq"]
    with pytest.raises(TypeError):
        tiles.TILES["fwd"][64] = Tile(16, 16, 1, 1)
    with pytest.raises(AttributeError):
        tiles.TILES["fwd"][64].block_m = 16
    with pytest.raises(TypeError):
        Tuning({"fwd": (16, 16, 1, 1)}).tiles["dq"] = Tile(16, 16, 1, 1)


def test_tuning_overrides_its_roles_only_and_round_trips():
    tuning = Tuning({"dq": (16, 32, 2, 1), "dkdv_owned": Tile(16, 16, 1, 1)}, short_run_tiles=0)
    assert tile_config("dq", 64, torch.bfloat16, tuning=tuning) == Tile(16, 32, 2, 1)
    # an override wins over the interpreter's tile; other roles keep theirs
    assert tile_config("dq", 64, torch.float32, interpreter=True, tuning=tuning) == Tile(16, 32, 2, 1)
    assert tile_config("fwd", 64, torch.bfloat16, tuning=tuning) == Tile(64, 64, 4, 3, 128)
    assert Tuning.decode(tuning.encode()) == tuning and hash(Tuning.decode(tuning.encode())) == hash(tuning)
    swapped = Tuning({"dkdv_owned": Tile(16, 16, 1, 1), "dq": (16, 32, 2, 1)}, short_run_tiles=0)
    assert swapped == tuning and hash(swapped) == hash(tuning)
    assert Tuning.decode([]) is None and Tuning.decode(Tuning().encode()) == Tuning()
    capped = Tuning({"dkdv": (32, 64, 4, 3, 168), "fwd": (64, 64, 4, 3, 0)})
    assert Tuning.decode(capped.encode()) == capped and capped.tiles["fwd"] == Tile(64, 64, 4, 3)
    assert tiles.short_run_tiles(tuning) == 0 and tiles.short_run_tiles(None) == tiles.SHORT_RUN_TILES
    for choice in (True, False):
        assert Tuning.decode(Tuning(owned_band=choice).encode()) == Tuning(owned_band=choice)
        assert tiles.owned_band(Tuning(owned_band=choice)) is choice
    assert tiles.owned_band(None) is None and tiles.owned_band(tuning) is None
    stepped = Tuning({"fwd": (64, 64, 4, 3)}, owned_band=False, owned_step_keys=32)
    assert Tuning.decode(stepped.encode()) == stepped and tiles.owned_step_keys(stepped) == 32
    for old_format in ([-1, -1], [8, -1, 0, 64, 64, 4, 3, 0]):  # two header ints, before owned_step_keys
        with pytest.raises(ValueError, match="no Tuning.encode"):
            Tuning.decode(old_format)
    assert tiles.owned_step_keys(None) == tiles.owned_step_keys(tuning) == tiles.OWNED_STEP_KEYS


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Tuning({"dkdv_fused": (32, 32, 4, 3)}), "unknown tile role"),
        (lambda: Tuning({"fwd": (48, 32, 4, 3)}), "block_m must be a power of two"),
        (lambda: Tuning({"fwd": (64, 8, 4, 3)}), "block_n must be a power of two >= 16"),
        (lambda: Tuning({"fwd": (64, 64, 3, 3)}), "num_warps"),
        (lambda: Tuning({"fwd": (64, 64, 4, 0)}), "num_stages"),
        (lambda: Tuning({"fwd": (64, 64, 4, 3, 300)}), "max_registers"),
        (lambda: Tuning(short_run_tiles=-1), "short_run_tiles"),
        (lambda: Tuning(owned_band=1), "owned_band"),
        (lambda: Tuning(owned_step_keys=48), "owned_step_keys"),
        (lambda: Tuning(owned_step_keys=8), "owned_step_keys"),
        (lambda: Tuning(owned_step_keys=True), "owned_step_keys"),
    ],
)
def test_bad_tuning_is_one_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.fixture(params=["interpreter", "compiled"])
def interpreted_plans(request, monkeypatch):
    """Launch plans with the interpreter's tile, then with the compiled tables, wherever the tests
    run (a plan is a pure function of its arguments and the tables: no kernel runs). True for the
    interpreter's."""
    monkeypatch.setattr(ops, "INTERPRET", request.param == "interpreter")
    ops._forward_plan.cache_clear()
    ops._backward_plan.cache_clear()
    yield ops.INTERPRET
    ops._forward_plan.cache_clear()
    ops._backward_plan.cache_clear()


def _plan(pattern, n, dtype=torch.bfloat16, d=64, tuning=None, B=2, H=4):
    spec = ops.encode(pattern, H)
    return ops.forward_plan(spec, B, H, n, d, d, dtype, tuning), ops.backward_plan(spec, B, H, n, d, d, dtype, tuning)


def test_plans_give_every_launch_its_role_and_tile(interpreted_plans):
    """Strided at n = 16K, l = 128 (the compiled tiles and the interpreter's): a band pass and a
    transposed stride pass forward; backward, the band's dQ pass, its dK/dV launch and the owned
    stride launch (classes of 128 keys, one program each). Forced owned band: a delta launch, the
    owned band's two launches (even and odd chunks of 128 keys) and the owned stride launch. At 64K,
    l = 256 the stride term has a dQ pass, so the band (4 key tiles) runs owned by default."""
    fwd, bwd = _plan(P.strided(128), 16384)
    assert [(x.kernel, x.role) for x in fwd] == [("attn_fwd", "fwd"), ("attn_fwd", "fwd_stride")]
    _, forced = _plan(P.strided(128), 16384, tuning=Tuning(owned_band=True))
    band = [x for x in forced.launches if x.role == "dkdv_band"]
    assert [x.meta["PARITY"] for x in band] == [0, 1] and all(x.meta["OWNED"] for x in band)
    chunk_keys = band[0].meta["CHUNK"] * band[0].meta["BLOCK_N"]
    assert chunk_keys >= 128 and chunk_keys % band[0].meta["BLOCK_M"] == 0
    assert [x.grid[0] for x in band] == [16384 // chunk_keys // 2] * 2
    _, long_classes = _plan(P.strided(256), 65536)
    for other in (_plan(P.strided(256), 65536, dtype=torch.float32)[1], _plan(P.strided(256), 65536, d=128)[1]):
        assert "dkdv_band" not in [x.role for x in other.launches]  # measured for 16-bit inputs, d <= 64 only
    if interpreted_plans:  # the interpreter's tile holds classes of at most 32 keys
        assert [x.role for x in bwd.launches] == ["dq_stride", "dkdv_band", "dkdv_band", "dkdv_stride"]
        assert [x.role for x in forced.launches] == ["dq_stride", "dkdv_band", "dkdv_band", "dkdv_stride"]
        return
    assert [x.role for x in bwd.launches] == ["dq", "dkdv", "dkdv_owned"] and not bwd.zero_dq
    assert [x.role for x in forced.launches] == ["delta", "dkdv_band", "dkdv_band", "dkdv_owned"] and forced.zero_dq
    assert [x.role for x in long_classes.launches] == ["dq_stride", "dkdv_band", "dkdv_band", "dkdv_stride"]
    for x in (*fwd, *bwd.launches, *forced.launches[1:]):
        t = tile_config(x.role, 64, torch.bfloat16)
        assert (x.meta["BLOCK_M"], x.meta["num_warps"], x.meta["num_stages"]) == (t.block_m, t.num_warps, t.num_stages)
    # classes of 128 keys: one program per class walks them as two key tiles of 64
    owned = bwd.launches[-1]
    assert owned.meta["OWNED"] and (owned.meta["BLOCK_N"], owned.meta["CHUNK"], owned.meta["CHUNK_STEP"]) == (64, 2, 1)
    assert owned.grid == (128, 2 * 4) and owned.args == (0, 1, 4, 2)
    _, one_tile = _plan(P.strided(128), 16384, tuning=Tuning(owned_step_keys=128))
    assert (one_tile.launches[-1].meta["BLOCK_N"], one_tile.launches[-1].meta["CHUNK"]) == (128, 0)
    assert fwd[0].grid == (16384 // 64, 2 * 4)
    _, long_window = _plan(P.strided(1024), 1 << 20, B=1)  # a window of 16 key tiles: two-pass
    assert "dkdv_band" not in [x.role for x in long_window.launches]


def test_plans_order_grids_and_walk_dkdv_as_measured(interpreted_plans):
    """Where a program's work varies with its tile, the plan walks the grid tile-major with the
    longest programs first (forward of a summary pass: last tile first; dK/dV of summary and stride
    keys: first tile first); equal-work launches and every dQ pass keep the head-major order. A split
    dK/dV walk runs as one loop except for a stride term; a tile's register cap reaches the launch."""
    fwd, bwd = _plan(P.fixed(128, 32), 16384)
    assert [x.meta["ORDER"] for x in fwd] == [1]
    orders = {x.role: x.meta["ORDER"] for x in bwd.launches}
    assert orders == {"dq_summary": 0, "dkdv": 0, "dkdv_summary": 2}
    fwd, bwd = _plan(P.strided(1024), 1 << 20, B=1)
    assert [x.meta["ORDER"] for x in fwd] == [0, 0]
    assert {x.role: x.meta["ORDER"] for x in bwd.launches} == {"dq": 0, "dq_stride": 0, "dkdv": 0, "dkdv_stride": 2}
    dkdv = {x.role: x.meta for x in bwd.launches if x.kernel == "attn_bwd_dkdv"}
    assert dkdv["dkdv"]["SPLIT"] and dkdv["dkdv_stride"]["SPLIT"]
    assert dkdv["dkdv"]["ONE_LOOP"] and not dkdv["dkdv_stride"]["ONE_LOOP"]
    for role in ("dkdv", "dkdv_stride"):
        cap = tile_config(role, 64, torch.bfloat16, interpreter=interpreted_plans).max_registers
        assert dkdv[role].get("maxnreg") == cap and (cap is None) == interpreted_plans
    _, capped = _plan(P.strided(1024), 1 << 20, B=1, tuning=Tuning({"dkdv": (32, 32, 2, 1, 96)}))
    assert [x.meta.get("maxnreg") for x in capped.launches if x.role == "dkdv"] == [96]
    _, fp32 = _plan(P.strided(1024), 1 << 20, B=1, dtype=torch.float32)
    assert all("maxnreg" not in x.meta for x in fp32.launches)


def test_tuning_changes_the_plan_of_that_call_only(interpreted_plans):
    tuning = Tuning({"fwd": (16, 16, 1, 1), "dkdv_owned": (32, 16, 1, 1)}, short_run_tiles=0)
    fwd, bwd = _plan(P.strided(64), 4096, tuning=tuning)
    assert (fwd[0].meta["BLOCK_M"], fwd[0].meta["BLOCK_N"], fwd[0].meta["num_warps"]) == (16, 16, 1)
    assert fwd[0].meta["SPLIT"]  # short_run_tiles=0: every range walk splits
    assert "dkdv_owned" not in [x.role for x in bwd.launches]  # classes of 64 no longer fit 16 keys
    fwd_default, bwd_default = _plan(P.strided(64), 4096)
    assert (
        fwd_default[0].meta["BLOCK_M"] == tile_config("fwd", 64, torch.bfloat16, interpreter=interpreted_plans).block_m
    )
    if not interpreted_plans:
        assert "dkdv_owned" in [x.role for x in bwd_default.launches]


@cpu_interpreter
@pytest.mark.parametrize("name", ["strided-both", "fixed-both", "multihead-fixed"])
def test_other_tiles_give_the_reference(name):
    """Tiles other than the interpreter's (tall, wide, and a stride class longer than the owned tile,
    so the stride term takes the two-pass backward) through ``sparse_attention``."""
    tuning = Tuning(
        {
            "fwd": (16, 64, 1, 1),
            "fwd_summary": (64, 16, 1, 1),
            "fwd_stride": (16, 16, 1, 1),
            "dq": (16, 32, 1, 1),
            "dq_summary": (32, 16, 1, 1),
            "dkdv": (64, 16, 1, 1),
            "dkdv_summary": (16, 16, 1, 1),
            "dkdv_owned": (16, 16, 1, 1),
            "dkdv_band": (32, 16, 1, 1),
        },
        short_run_tiles=1,
    )
    q, k, v, do = random_qkv(1, 4, 150, 32, 32, torch.float32, seed=21)
    errors = _reference_comparison(GRID[name], q, k, v, do, tuning=tuning)
    assert max(errors) < 2e-5, errors


@contextlib.contextmanager
def _launch_kwargs(kernel):
    """The keyword arguments (constexprs) of every launch of ``kernel`` inside the block, through
    Triton's own pre-run hook."""
    seen = []
    hook = lambda *args, **kwargs: seen.append(kwargs)
    kernel.add_pre_run_hook(hook)
    try:
        yield seen
    finally:
        kernel.pre_run_hooks.remove(hook)


@cpu_interpreter
def test_the_backward_uses_the_call_s_tuning():
    """The tuning reaches the backward of its own call: a 16-key owned tile makes strided(8) at
    n = 200 (classes of 25) take the two-pass stride backward instead of the owned launch."""
    pattern = P.strided(8)
    q, k, v, do = random_qkv(1, 2, 200, 32, 32, torch.float32, seed=4)
    two_pass = Tuning({"dkdv_owned": (32, 16, 1, 1)})
    for tuning, owned in ((None, True), (two_pass, False)):
        out = triton_attention(q, k, v, pattern, tuning=tuning)
        with _launch_kwargs(ops.kernels.attn_bwd_dkdv) as seen:
            torch.autograd.grad(out, (q, k, v), do)
        assert any(kw["OWNED"] and kw["STEP"] > 1 for kw in seen) == owned
    _check(pattern, q, k, v, do, tuning=two_pass)


@cpu_interpreter
@pytest.mark.parametrize(
    "pattern, n, band_tile",
    [
        (P.local(5), 150, (32, 32, 1, 1)),  # window inside one tile: chunks of one tile
        (P.local(33), 150, (32, 16, 1, 1)),  # window just past a query tile: chunks of 64 keys, 4 key tiles
        (P.strided(20), 150, (16, 32, 1, 1)),  # query tiles narrower than key tiles; the band's last chunk partial
        (P.strided(64), 100, (32, 32, 1, 1)),  # a long band that splits into masked/full/masked runs; 1.5 chunks
    ],
    ids=["local5", "local33", "strided20", "strided64"],
)
def test_owned_band_equals_the_two_pass_backward(pattern, n, band_tile):
    """The owned band backward (dQ, dK, dV from each key tile's one walk; even then odd chunks)
    against the fp32 reference, and its gradients against the band's dQ pass plus dK/dV launch."""
    q, k, v, do = random_qkv(1, 2, n, 32, 32, torch.float32, seed=n)
    owned = Tuning({"dkdv_band": band_tile}, short_run_tiles=1, owned_band=True)
    out = triton_attention(q, k, v, pattern, tuning=owned)
    with _launch_kwargs(ops.kernels.attn_bwd_dkdv) as seen:
        grads = torch.autograd.grad(out, (q, k, v), do)
    assert sorted(kw["PARITY"] for kw in seen if kw["CHUNK"] and kw["CHUNK_STEP"] == 2) == [0, 1]
    out2 = triton_attention(q, k, v, pattern, tuning=Tuning(owned_band=False))
    grads2 = torch.autograd.grad(out2, (q, k, v), do)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _check(pattern, q, k, v, do, tuning=owned)


@cpu_interpreter
@pytest.mark.parametrize(
    "pattern, n, dk",
    [
        (P.strided(8), 200, 32),  # classes of 25: two key tiles of 16, the second partial
        (P.strided(8), 203, 40),  # classes of 26 and 25; head dim padded to 64: the plain dQ product
        (P.strided(8), 200, 64),  # head dim 64: the transposed dQ product (kernels._owned_dq)
        (P.strided(6, "stride"), 150, 40),  # every pass owned: delta launch, dQ from zeros
        (P.strided(8), 397, 40),  # classes of 50: four key tiles of 16 against one of 64
    ],
    ids=["l8", "l8-uneven-d40", "l8-d64", "stride-only-d40", "l8-four-steps"],
)
def test_owned_classes_in_key_steps_equal_one_key_tile(pattern, n, dk):
    """An owned class walked in key tiles of 16 by its one program (``Tuning.owned_step_keys``)
    against the same class in one key tile, and against the fp32 reference."""
    q, k, v, do = random_qkv(1, 2, n, dk, 32, torch.float32, seed=n)
    grads = []
    own = max(16, 1 << (-(-n // pattern.stride) - 1).bit_length())  # the class length as a power of two
    wide = {"dkdv_owned": (32, 64, 1, 1)}  # classes up to 64 keys owned
    for step, chunks in ((16, own // 16), (64, 0)):
        tuning = Tuning(wide, owned_step_keys=step)
        out = triton_attention(q, k, v, pattern, tuning=tuning)
        with _launch_kwargs(ops.kernels.attn_bwd_dkdv) as seen:
            grads.append(torch.autograd.grad(out, (q, k, v), do))
        assert [(kw["BLOCK_N"], kw["CHUNK"]) for kw in seen if kw["OWNED"]] == [(min(step, own), chunks)]
        _check(pattern, q, k, v, do, tuning=tuning)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
        (q, k, v, spec, 0.25, []),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    fn = torch.compile(lambda a, b, c: triton_attention(a, b, c, P.fixed(8, 2)), backend="eager", fullgraph=True)
    assert torch.allclose(fn(q, k, v), triton_attention(q, k, v, P.fixed(8, 2)))


@cpu_interpreter
def test_custom_ops_fake_outputs_match_the_kernels_for_strided_inputs():
    """The model's q, k, v are views of one [B, n, H, d] projection (heads not contiguous); the
    kernels' outputs are contiguous whatever the inputs' strides, and the fake (meta) kernels must
    say so, or inductor's stride asserts fail under torch.compile (seen on the H200 with the
    backward's fake returning empty_like of the inputs)."""
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(1, 24, 3, 2, 16, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    spec = ops.encode(P.strided(8), 2)
    out, lse = ops.attention_fwd(q, k, v, spec, 0.25, [])
    do = torch.randn(out.shape, generator=g)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.attention_fwd, (q, k, v, spec, 0.25, []), test_utils=checks)
    torch.library.opcheck(ops.attention_bwd, (do, q, k, v, out, lse, spec, 0.25, []), test_utils=checks)


def _projection_views(B, n, H, dk, dv, dtype, device, seed):
    """q, k, v as the model makes them: ``[B, H, n, d]`` views of one ``[B, n, H·(2·dk + dv)]``
    projection (requiring grad), and an output gradient ``[B, H, n, dv]``."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, n, H * (2 * dk + dv), generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    q, k, v = (t.view(B, n, H, -1).transpose(1, 2) for t in qkv.split([H * dk, H * dk, H * dv], dim=-1))
    return q, k, v, torch.randn(B, H, n, dv, generator=g).to(device=device, dtype=dtype)


@cpu_interpreter
@pytest.mark.parametrize(
    "pattern, tuning",
    [
        (P.strided(8), None),  # dQ pass, dK/dV, owned stride launch
        (P.strided(8), Tuning(owned_band=True)),  # the delta launch and the owned band's chunks
        (P.fixed(8, 2, num_verts=2), None),  # two head groups, summary passes
        (P.fixed(8, 2, part="summary"), None),  # dK/dV start from zeros
    ],
    ids=["strided", "strided-owned-band", "fixed-2verts", "fixed-summary"],
)
def test_views_of_one_projection_give_outputs_and_gradients_in_their_layout(pattern, tuning):
    """The model's q, k, v are views of one ``[B, n, 2·H·dk + H·dv]`` projection (heads inside each
    position). The output and the gradients come back in that positions-major order (the model's
    merge of the heads is then a view, and the gradients of the projection a row-wise
    concatenation), and match PyTorch's attention as for contiguous inputs."""
    B, n, H, dk, dv = 2, 40, 2, 8, 16
    q, k, v, do = _projection_views(B, n, H, dk, dv, torch.float32, "cpu", seed=11)
    _check(pattern, q, k, v, do, tuning=tuning)
    spec, enc = ops.encode(pattern, H), tuning.encode() if tuning else []
    out, lse = ops.attention_fwd(q, k, v, spec, dk**-0.5, enc)
    grads = ops.attention_bwd(do.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, out, lse, spec, dk**-0.5, enc)
    for t in (out, *grads):
        assert t.transpose(1, 2).is_contiguous(), t.stride()
    contiguous = [t.detach().contiguous() for t in (q, k, v)]
    out_c, lse_c = ops.attention_fwd(*contiguous, spec, dk**-0.5, enc)
    assert out_c.is_contiguous() and torch.equal(out_c, out)
    grads_c = ops.attention_bwd(do.contiguous(), *contiguous, out_c, lse_c, spec, dk**-0.5, enc)
    for a, b in zip(grads_c, grads):
        assert a.is_contiguous() and torch.equal(a, b)


def _packed_against_views(qkv, H, dk, pattern, tuning, dout):
    """The packed op on ``qkv`` against :func:`triton_attention` on views of it: the output
    ``[B, n, H·dv]`` and the gradient of ``qkv``, both contiguous, bitwise equal (the same kernels
    on the same memory, the gradients written to one tensor instead of three)."""
    from sparse_transformer import sparse_attention_qkvpacked
    from sparse_transformer.attention.common import merge_heads, split_heads

    out = sparse_attention_qkvpacked(qkv, H, pattern, H * dk, backend="triton", tuning=tuning)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    views = merge_heads(triton_attention(*split_heads(qkv, H, H * dk), pattern, tuning=tuning))
    (grad_views,) = torch.autograd.grad(views, qkv, dout)
    assert out.is_contiguous() and grad.is_contiguous()
    assert torch.equal(out, views) and torch.equal(grad, grad_views)


@cpu_interpreter
@pytest.mark.parametrize(
    "pattern, tuning",
    [
        (P.strided(8), None),
        (P.strided(8), Tuning(owned_band=True)),
        (P.fixed(8, 2, num_verts=2), None),
        (P.fixed(8, 2, part="summary"), None),  # dK/dV start from zeros: the packed gradient's slices
        (P.strided(2), Tuning(owned_step_keys=16)),  # classes of 20: two key tiles of 16 per program
    ],
    ids=["strided", "strided-owned-band", "fixed-2verts", "fixed-summary", "strided-owned-steps"],
)
def test_packed_projection_equals_its_views(pattern, tuning):
    """``sparse_attention_qkvpacked`` on the triton backend (the packed custom op: dV written with
    its own strides into the packed gradient) gives what the views of the same projection give,
    and that matches PyTorch's attention (the views' test above); half-size q and k."""
    B, n, H, dk, dv = 2, 40, 2, 8, 16
    q, _, _, do = _projection_views(B, n, H, dk, dv, torch.float32, "cpu", seed=13)
    qkv = q._base
    _packed_against_views(qkv, H, dk, pattern, tuning, do.transpose(1, 2).reshape(B, n, H * dv))


@cpu_interpreter
def test_packed_custom_ops_registration():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 24, 3 * 2 * 16, generator=g)
    spec = ops.encode(P.fixed(8, 2), 2)
    out, lse = ops.attention_qkvpacked_fwd(qkv, 2, 32, spec, 0.25, [])
    do = torch.randn(out.shape, generator=g)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        ops.attention_qkvpacked_fwd,
        (qkv.requires_grad_(), 2, 32, spec, 0.25, []),
        test_utils=(*checks, "test_autograd_registration"),
    )
    torch.library.opcheck(
        ops.attention_qkvpacked_bwd, (do, qkv.detach(), out, lse, 2, 32, spec, 0.25, []), test_utils=checks
    )


_COMPILE_FOR_HOPPER = """
import json
from sparse_transformer.attention.triton import Tuning
from sparse_transformer.bench.tiles import sass_report

rows = sass_report(["strided:128@16K", "fixed:128:32@16K", "strided:1024@1M", "fixed:256:32@64K"], heads=4)
rows += sass_report(["strided:128@16K"], heads=4, tuning=Tuning(owned_band=True))
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The kernels as the GPU runs them (not the interpreter, which accepts code the compiler does
    not): every launch of strided (owned band backward or not) and fixed at n = 16K, strided l=1024 at
    1M and fixed l=256 at 64K, bf16, head dim 64, compiled to an sm_90 cubin through Triton's own
    pipeline (ptxas included) in a fresh process without the interpreter (``bench tiles --sass``).
    Each launch's machine code issues its tensor-core products asynchronously: fewer wgmma waits than
    wgmma instructions (the three-loop dK/dV walk once had ptxas put a wait after every one)."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env, timeout=1800
    )
    if res.returncode and "compile internals differ" in res.stderr:
        pytest.skip(res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    roles = {
        "fwd",
        "fwd_stride",
        "fwd_summary",
        "dq",
        "dq_stride",
        "dq_summary",
        "dkdv",
        "dkdv_stride",
        "dkdv_owned",
        "dkdv_summary",
        "dkdv_band",
        "delta",
    }
    assert {r["role"] for r in rows} == roles
    assert all(r["registers"] for r in rows)
    serialized = [
        f"{r['role']} of {r['case']}: {r['wgmma']} wgmma, {r['wgmma_waits']} waits" for r in rows if r["serialized"]
    ]
    assert not serialized, serialized
    assert all(r["wgmma"] > 0 for r in rows if r["role"] != "delta")  # the products are wgmma


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
    ("strided", 16384, 1, 2, 40, 40, torch.bfloat16, 128),  # owned classes in key steps, padded: the plain dQ product
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
    _check(_gpu_pattern(name, l), q, k, v, do)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pattern, tuning, dk, dv, dtype",
    [
        (P.strided(128), None, 64, 64, torch.bfloat16),
        (P.strided(128), Tuning(owned_band=True), 64, 64, torch.bfloat16),
        (P.fixed(128, 32, num_verts=2), None, 64, 64, torch.bfloat16),
        (P.fixed(128, 32), None, 32, 64, torch.float16),  # half-size q and k (paper §5.1, model.qk_ratio 0.5)
    ],
    ids=["strided", "strided-owned-band", "fixed", "fixed-dk32-dv64-fp16"],
)
def test_gpu_views_of_one_projection_match_reference(pattern, tuning, dk, dv, dtype):
    """The model's layout on the GPU: q, k, v views of one projection, the output and the gradients
    laid out positions-major (``ops.heads_like``); and the packed op the model calls."""
    q, k, v, do = _projection_views(2, 4096, 4, dk, dv, dtype, "cuda", seed=5)
    _check(pattern, q, k, v, do, tuning=tuning)
    out = triton_attention(q, k, v, pattern, tuning=tuning)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert all(t.transpose(1, 2).is_contiguous() for t in (out, *grads))
    # the packed op (the model's path): bitwise what the views give
    _packed_against_views(q._base, 4, dk, pattern, tuning, do.transpose(1, 2).reshape(2, 4096, 4 * dv))


@pytest.mark.gpu
@pytest.mark.parametrize("owned_band", [True, False], ids=["owned-band", "two-pass-band"])
@pytest.mark.parametrize("l", [128, 1024])  # chunks of 2 key tiles (one masked loop); of 16 (split runs)
def test_gpu_band_backward_matches_reference(l, owned_band):
    """The band term's backward both ways on the GPU, where programs of a launch run concurrently:
    the owned band's even/odd chunk launches must not race on dQ rows."""
    q, k, v, do = random_qkv(2, 2, 16384, 64, 64, torch.bfloat16, device="cuda", seed=l)
    _check(P.strided(l), q, k, v, do, tuning=Tuning(owned_band=owned_band))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pattern, tuning, n",
    [
        (P.strided(128), None, 4096),
        (P.strided(128), Tuning(owned_band=True), 4096),
        (P.fixed(128, 32), None, 4096),
        (P.strided(128), None, 16384),  # owned classes of 128 keys, walked in two key tiles by one program
    ],
    ids=["strided", "strided-owned-band", "fixed", "strided-owned-steps"],
)
def test_gpu_deterministic_grads_are_bitwise_identical(pattern, tuning, n):
    q, k, v, do = random_qkv(2, 4, n, 64, 64, torch.bfloat16, device="cuda", seed=1)
    runs = [torch.autograd.grad(triton_attention(q, k, v, pattern, tuning=tuning), (q, k, v), do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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
def test_gpu_fp32_matches_reference():
    """fp32 (tf32x3 dots) at d=64 and a small n, last in the file: fp32 kernels are the slowest to
    compile (an earlier 'ieee' build stalled for minutes), so a slow compile stops nothing else."""
    q, k, v, do = random_qkv(1, 2, 1024, 64, 64, torch.float32, device="cuda", seed=8)
    # tf32x3 dots: a looser floor than the CPU's fp32 (the former rule's 1e-4 of the largest value)
    _check(P.fixed(128, 32, num_verts=2), q, k, v, do, atol_rel=1e-4)
    _check(P.strided(32), q, k, v, do, atol_rel=1e-4)  # owned classes of 32: the transposed dQ product
