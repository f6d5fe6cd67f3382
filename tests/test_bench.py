"""The benchmarks run at tiny sizes on CPU and emit valid JSON lines and a table (timings are never
asserted)."""

import argparse
import json

import pytest
import torch
from conftest import SMALLEST_MODEL, overrides

from sparse_transformer import patterns as P
from sparse_transformer.bench import attention as bench_attention_mod
from sparse_transformer.bench import sample as bench_sample_mod
from sparse_transformer.bench import train as bench_train_mod
from sparse_transformer.bench.attention import bench_attention, pattern_for, useful_pairs
from sparse_transformer.bench.train import bench_train
from sparse_transformer.config import Config
from sparse_transformer.errors import UserError
from sparse_transformer.options import comma_list


def parse(module, options: str, *more: str) -> argparse.Namespace:
    """``options`` (split at spaces) and then ``more`` (paths, kept whole) parsed as the options of
    ``sparse-transformer bench WHAT`` (``module``: bench.WHAT)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([*options.split(), *more])


def test_pattern_for_sizes_by_length():
    assert [pattern_for("strided", n).stride for n in (4096, 16384, 65536, 262144, 1048576)] == [
        64,
        128,
        256,
        512,
        1024,
    ]
    assert (pattern_for("fixed", 16384).stride, pattern_for("fixed", 65536).stride, pattern_for("fixed", 4096).c) == (
        128,
        256,
        32,
    )
    assert pattern_for("fixed:64:8", 1 << 20) == P.fixed(64, 8)
    assert pattern_for("strided:32", 1024) == P.strided(32)
    with pytest.raises(UserError):
        pattern_for("banded", 1024)
    with pytest.raises(UserError):
        pattern_for("fixed:16:32", 1024)  # c > l


def test_useful_pairs_counts_allowed_pairs():
    n = 100
    assert useful_pairs(P.dense(), n, heads=3, batch=2) == 2 * 3 * n * (n + 1) // 2
    p = P.multihead(P.strided(10))
    assert useful_pairs(p, n, heads=4, batch=1) == sum(int(p.mask(n, h).sum()) for h in range(4))


def test_bench_attention_cpu_jsonl_and_table(tmp_path, capsys):
    out = tmp_path / "attn.jsonl"
    options = "--device cpu --backends factorized,sdpa,flex --patterns strided:8,fixed:8:2 --n 64 --batch-tokens 128"
    args = parse(bench_attention_mod, options + " --heads 2 --head-dim 8", "--out", str(out))
    assert bench_attention_mod.run(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # dense sdpa (1 pattern) + factorized and flex on 2 patterns, each fwd and fwdbwd
    assert len(records) == 2 * (1 + 2 + 2)
    for r in records:
        assert r["n"] == 64 and r["batch"] == 2
        if r["backend"] == "flex":
            assert r["error"].startswith("skipped")  # CUDA only
            continue
        assert "error" not in r, r
        assert r["ms"] > 0 and r["useful_tflops"] > 0 and r["peak_mib"] >= 0
        if r["backend"] == "factorized":
            assert set(r["speedup_vs"]) == {"sdpa"}
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert table.startswith("| n | B | pattern | backend | mode | ms |")
    assert "| 64 | 2 | strided l=8 | factorized | fwdbwd |" in table
    assert "skipped: flex needs CUDA" in table


def test_bench_attention_records_failures():
    recs = bench_attention(
        backends=["factorized"],
        patterns=["strided:8"],
        ns=[32],
        batch_tokens=32,
        heads=1,
        head_dim=4,
        device="cpu",
        modes=["fwd"],
        max_n={"factorized": 16},
        verbose=False,
    )
    assert recs[0]["error"].startswith("skipped: n > 16")
    with pytest.raises(UserError):
        bench_attention(backends=["nope"], ns=[32], device="cpu", verbose=False)


def test_bench_train_cpu_sparse_vs_dense(tmp_path):
    cfg = Config()
    out = tmp_path / "train.jsonl"
    recs = bench_train(
        cfg,
        n=64,
        batch=2,
        steps=1,
        warmup=1,
        sparse_backend="factorized",
        device="cpu",
        overrides=overrides(SMALLEST_MODEL, {"model.d_model": 32}),
        target=1.0,
        case="tiny",
        out_jsonl=str(out),
        verbose=False,
    )
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    sparse, dense = recs
    assert sparse["pattern"] == "fixed l=8 c=2" and sparse["backend"] == "factorized" and sparse["checkpoint"]
    assert not sparse["compiled"]  # CPU: train.compile leaves the blocks eager
    assert dense["pattern"] == "dense" and dense["backend"] == "sdpa"
    assert sparse["params"] == dense["params"] > 0
    assert sparse["tokens_per_s"] > 0 and dense["tokens_per_s"] > 0
    assert sparse["speedup_vs_dense"] > 0 and "target_met" in sparse
    table = bench_train_mod.format_table(recs)
    assert table.count("\n") == 3 and "| tiny | 1L d32 h2 | 64 | 2 | fixed l=8 c=2 | factorized |" in table


def test_bench_train_failure_names_the_innermost_cause():
    """A compiler's wrapper says only ``backend='inductor' raised:`` on its first line; the record
    names what went wrong inside it (its ``inner_exception`` or ``__cause__``)."""

    class Wrapper(Exception):
        def __init__(self, inner):
            super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: {inner}")
            self.inner_exception = inner

    inner = AssertionError("Node add_144 was invalid, but is output\nmore detail")
    assert bench_train_mod._error_line(Wrapper(inner)) == "AssertionError: Node add_144 was invalid, but is output"
    try:
        raise RuntimeError("outer") from ValueError("\n  the cause  \n")
    except RuntimeError as e:
        assert bench_train_mod._error_line(e) == "ValueError: the cause"
    assert bench_train_mod._error_line(torch.OutOfMemoryError("CUDA out of memory. Tried")).startswith("out of memory")
    try:  # an out-of-memory error raised from another keeps its label
        raise torch.OutOfMemoryError("CUDA out of memory. Tried") from KeyError("k")
    except torch.OutOfMemoryError as e:
        assert bench_train_mod._error_line(e) == "out of memory: CUDA out of memory. Tried"
    a, b = RuntimeError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a  # a cycle ends the walk
    assert bench_train_mod._error_line(a) == "ValueError: b"


def test_bench_train_compiles_each_model_afresh(monkeypatch):
    """Dynamo's caches are reset after every model: the blocks of all models share their code, and
    a long list of cases and backends would otherwise reach dynamo's recompile limit and time the
    later models eager without saying so."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    recs = bench_train(
        Config(),
        n=32,
        batch=1,
        steps=1,
        warmup=0,
        sparse_backend=["factorized", "reference"],
        device="cpu",
        overrides=overrides(SMALLEST_MODEL, {"model.d_model": 32}),
        verbose=False,
    )
    assert len(recs) == 3 and len(resets) == 3  # two sparse backends and dense


def test_bench_train_cli_case_without_dense(capsys):
    options = "--case audio1m --n 256 --steps 1 --warmup 0 --device cpu --set model.n_layer=1 --set model.stride=16"
    args = parse(bench_train_mod, options)
    assert bench_train_mod.run(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (rec,) = [json.loads(line) for line in lines]
    assert rec["case"] == "audio1m" and rec["n"] == 256 and rec["d_model"] == 128 and "dense not run" in rec["note"]


def test_bench_tiles_cases_and_winners():
    """``bench tiles`` needs a GPU to time anything; its case specs and its choice of winners are
    checked here (winners: least time relative to the committed tile, summed over the cases that
    launch the role)."""
    from sparse_transformer.bench import tiles as bench_tiles_mod

    assert bench_tiles_mod.parse_case("fixed:128:32@16K", 131072)[1:] == (P.fixed(128, 32), 16384, 8)
    assert bench_tiles_mod.parse_case("strided@1M", 131072)[1:] == (P.strided(1024), 1 << 20, 1)
    for bad in ("strided:128", "strided:128@lots", "banded@16K"):
        with pytest.raises(UserError):
            bench_tiles_mod.parse_case(bad, 131072)
    a, b, c = (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 3)
    cands = {"fwd": [a, b, c], "dkdv": [b, a], "dq_summary": [a, b]}
    results = {  # (variant, case) -> {role: ms}; variant 2 gives dkdv its candidate 2 % 2 = 0
        (0, "x"): {"fwd": 1.0, "dkdv": 2.0},
        (0, "y"): {"fwd": 10.0, "dkdv": 20.0},
        (1, "x"): {"fwd": 0.5, "dkdv": 3.0},
        (1, "y"): {"fwd": 12.0, "dkdv": 30.0},  # fwd: 0.5 + 1.2 = 1.7 < 2 (committed)
        (2, "x"): {"fwd": 0.9},  # c: 0.9 + 0.85 = 1.75
        (2, "y"): {"fwd": 8.5},
    }
    winners, scores = bench_tiles_mod.pick_winners(results, cands)
    assert winners == {"fwd": b, "dkdv": b}  # dq_summary is launched by no case: no winner
    assert scores["fwd"] == {str(a): 2.0, str(b): 1.7, str(c): 1.75}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_tiles_without_cuda_is_one_clear_error(capsys):
    from sparse_transformer.cli import main

    assert main(["bench", "tiles", "--cases", "strided:8@64"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert main(["bench", "tiles", "--profile", "--cases", "strided:8@64"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert main(["bench", "tiles", "--ncu-range", "--cases", "strided:8@64"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_bench_tiles_sass_refusals_are_one_clear_line(capsys, monkeypatch):
    """``bench tiles --sass`` compiles for the GPU on any machine (the slow Hopper compile test in
    test_triton.py runs it); it refuses to run beside --profile or on interpreter-built kernels."""
    from sparse_transformer.attention.triton import ops
    from sparse_transformer.cli import main

    assert main(["bench", "tiles", "--sass", "--profile", "--cases", "strided:8@64"]) == 2
    assert "separate modes" in capsys.readouterr().err
    assert main(["bench", "tiles", "--profile", "--ncu-range", "--cases", "strided:8@64"]) == 2
    err = capsys.readouterr().err
    assert "--profile and --ncu-range are separate modes" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(ops, "INTERPRET", True)
    assert main(["bench", "tiles", "--sass", "--cases", "strided:8@64"]) == 2
    assert "without TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.parametrize("owned_band", [None, True], ids=["default-plan", "owned-band"])
@pytest.mark.parametrize("pattern", [P.strided(8), P.fixed(8, 2, num_verts=2), P.local(5)], ids=str)
def test_launch_work_counts_every_allowed_pair_once_per_walk(pattern, owned_band):
    """``bench tiles --profile``'s work model: the forward launches together compute every allowed
    pair once (2 matmuls of 2·d FLOPs each: the 4·d per pair of useful FLOP counts), and so do the
    dK/dV launches (the owned band's two launches split the keys); compulsory bytes read q, k, v at least."""
    pytest.importorskip("triton")
    from sparse_transformer.attention.triton import Tuning, ops
    from sparse_transformer.bench.tiles import launch_work

    B, H, n, d = 2, 4, 100, 16
    spec = ops.encode(pattern, H)
    tuning = Tuning(owned_band=owned_band) if owned_band else None
    fwd = ops.forward_plan(spec, B, H, n, d, d, torch.bfloat16, tuning)
    bwd = ops.backward_plan(spec, B, H, n, d, d, torch.bfloat16, tuning).launches
    allowed = B * sum(pattern.num_pairs(n, hs[0]) * len(hs) for _, hs in pattern.head_groups(H))
    work = lambda launches: [launch_work(x, n, d, 2, B * H) for x in launches]
    assert sum(f for f, _ in work(fwd)) == allowed * 4 * d
    dkdv = [x for x in bwd if x.kernel == "attn_bwd_dkdv"]
    per_pair = [(4 + bool(x.meta["OWNED"])) * 2 * d for x in dkdv]
    assert sum(f // m for (f, _), m in zip(work(dkdv), per_pair, strict=True)) == allowed
    assert all(moved >= 3 * B * n * d * 2 for _, moved in work(fwd))
    has_band = any(isinstance(t, P.Band) and t.window for terms, _ in pattern.head_groups(H) for t in terms)
    assert ("dkdv_band" in [x.role for x in dkdv]) == bool(owned_band and has_band)


def test_bench_sample_cpu_passes_its_options_on(capsys):
    """`bench sample` on CPU: the options reach bench_sample by name; cached and uncached draw the same tokens."""
    options = "--length 24 --patterns strided, --num 2 --n-layer 1 --d-model 16 --n-head 2 --stride 4 --c 2 --threads 0"
    assert bench_sample_mod.run(parse(bench_sample_mod, options)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (rec,) = [json.loads(line) for line in lines]
    assert rec["pattern"] == "strided(stride=4, part='both')" and rec["length"] == 24 and rec["num"] == 2
    assert (rec["n_layer"], rec["d_model"], rec["n_head"]) == (1, 16, 2) and rec["same_tokens"]
    assert rec["no_cache_measured_steps"] == 24 and rec["cache_bytes"] == rec["dense_cache_bytes"]


def test_comma_lists():
    assert comma_list(" strided, fixed ,,") == ["strided", "fixed"] and comma_list(None) == comma_list("") == []


def test_bench_sample_cpu_fixed_with_the_default_stride(capsys):
    """--stride 0 means l = sqrt(length): the c <= l check must see that l, not 1 (it refused every default run)."""
    options = "--length 64 --patterns fixed --num 1 --n-layer 1 --d-model 16 --n-head 2 --c 8 --no-cache-steps 4"
    assert bench_sample_mod.run(parse(bench_sample_mod, options)) == 0
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rec["pattern"].startswith("fixed(stride=8, c=8")


def test_bench_sample_preset_is_refused_on_cpu(capsys):
    """--preset picks the CUDA benchmark's model: on CPU it was ignored (a typo ran the whole default)."""
    from sparse_transformer.cli import main

    assert main(["bench", "sample", "--preset", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "--preset 'nonsense' applies to --device cuda" in err and len(err.strip().splitlines()) == 1


def test_bench_train_set_must_be_section_key_value(capsys):
    from sparse_transformer.cli import main

    assert main(["bench", "train", "--config", "enwik8", "--set", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "--set 'nonsense' must look like SECTION.KEY=VALUE" in err and len(err.strip().splitlines()) == 1


def test_bench_tiles_ncu_csv_labels_each_launch_and_refuses_a_foreign_file(tmp_path, capsys):
    """``bench tiles --ncu-csv``: an ncu raw-page export (header row, units row, one row per kernel)
    read without a GPU, each attention kernel labelled with its case and role from the launch plans;
    a file with another kernel count, or without the metrics, is one clear error line."""
    pytest.importorskip("triton")
    import csv

    from sparse_transformer.bench import tiles as bench_tiles_mod
    from sparse_transformer.cli import main

    spec = "strided:8@64"
    _, pattern, n, batch = bench_tiles_mod.parse_case(spec, 256)
    plan = bench_tiles_mod.call_launches(pattern, batch, 2, n, 16, torch.bfloat16)
    metrics = [m for m, _ in bench_tiles_mod.NCU_METRICS.values()]
    stalls = [
        "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
        "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
        "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio",
    ]
    header = ["ID", "Kernel Name", *metrics, *stalls]
    rows = [header, ["", "", *["unit"] * (len(header) - 2)]]
    rows.append(["x", "at::vectorized_elementwise_kernel", *["1"] * (len(header) - 2)])  # not attention: skipped
    for i, launch in enumerate(plan):
        values = [str(1e6 * (i + 1)), "1,750,000,000", "50", "40", "30", "60", "20", "128", "4"]
        rows.append([str(i), f"{launch.kernel}(int, int)", *values, "1.5", str(0.5 + i), "1"])
    good = tmp_path / "r.csv"
    with open(good, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = bench_tiles_mod.ncu_summary(str(good), [spec], 256, 2, 16, "bf16")
    assert [r["role"] for r in out] == [x.role for x in plan]
    assert out[0]["ms"] == 1.0 and out[0]["sm_mhz"] == 1750.0 and out[0]["l2_throughput_pct"] == 60.0
    assert out[0]["stalls_per_issue"] == {"wait": 1.5, "barrier": 0.5}  # "selected" is the issue itself
    assert list(out[-1]["stalls_per_issue"]) == ["barrier", "wait"]

    def cli(path, cases):
        return main(f"bench tiles --ncu-csv {path} --cases {cases} --batch-tokens 256 --heads 2 --head-dim 16".split())

    assert cli(good, spec) == 0
    printed = capsys.readouterr().out
    assert all(f"| {x.role} |" in printed for x in plan)
    assert cli(good, f"{spec},{spec}") == 2
    err = capsys.readouterr().err
    assert f"holds {len(plan)} attention kernels" in err and len(err.strip().splitlines()) == 1
    bare = tmp_path / "bare.csv"
    bare.write_text("ID,Kernel Name,gpu__time_duration.sum\n,,ns\n0,attn_fwd,1\n")
    binary = tmp_path / "R.ncu-rep"
    binary.write_bytes(bytes(range(256)) * 4)  # the report itself, not its CSV export
    for path in (bare, binary):
        assert main(["bench", "tiles", "--ncu-csv", str(path), "--cases", spec]) == 2
        err = capsys.readouterr().err
        assert "--page raw --print-units base" in err and len(err.strip().splitlines()) == 1
    rows = bench_tiles_mod.ncu_summary(str(good), [spec], 256, 2, 16, "bf16")
    rows[0]["ms"] = rows[0]["registers"] = None  # an "n/a" cell prints empty
    assert "| 0 | fwd |  |" in bench_tiles_mod.format_ncu(rows)
