"""Tile sweep of the Triton kernels, per launch role, in one GPU call.

Every launch of a forward + backward is timed on its own (CUDA events around each kernel launch;
``ops`` resolves ``kernels.attn_*`` at call time, so wrapping them is enough). Variant ``i`` gives
every role of ``ops.CONFIGS`` its ``i``-th candidate at once, so one fwd+bwd per variant measures
all roles together; a role's winner is the candidate with the least time summed over the cases
that use it, each case's time divided by that case's best (so the 1M case does not outvote 16K).
Then the winners run together under each ``ops.SHORT_RUN_TILES`` (when a range term walks its tiles as
one masked loop) and the fwd+bwd times (``do_bench`` medians) are compared with the code as committed.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_tune.py [--budget S]

Writes ``$OUT/tune.jsonl`` (every measurement) and ``$OUT/tuned.json`` (the winners, head dim 64,
bf16: the file ``scripts/tuned_plugin.py`` applies to a pytest run), prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
from triton.testing import do_bench

from sparse_transformer import patterns as P
from sparse_transformer.attention.triton import kernels, ops, triton_attention

T0 = time.time()
OUT = os.environ.get("OUT", ".")

CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) per role; index 0 = as committed
    "fwd": [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (32, 32, 2, 3)],
    "fwd_summary": [(64, 64, 4, 3), (64, 32, 4, 3)],
    "fwd_stride": [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (32, 32, 2, 3)],
    "dq": [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 2, 3)],
    "dq_summary": [(64, 64, 4, 3), (64, 32, 4, 3)],
    "dq_stride": [(64, 32, 4, 3), (64, 64, 4, 3), (32, 32, 2, 3), (32, 64, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (32, 32, 2, 3)],
    "dkdv_stride": [(16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (16, 64, 4, 3)],
    "dkdv_summary": [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 3)],
    "dkdv_owned": [(32, 128, 4, 2), (16, 128, 4, 3), (32, 128, 4, 3), (16, 128, 4, 2)],
}
N_VARIANTS = max(len(c) for c in CANDIDATES.values())
SHORT_RUNS = (4, 0, 8)  # ops.SHORT_RUN_TILES: as committed, always split, more one-loop runs

CASES = [  # name, pattern, B, n, timed iterations
    ("strided l=128", P.strided(128), 8, 16384, 10),
    ("fixed l=128 c=32", P.fixed(128, 32), 8, 16384, 10),
    ("strided l=256", P.strided(256), 2, 65536, 10),
    ("strided l=1024", P.strided(1024), 1, 1048576, 4),
]
RECORD: list | None = None


def role_of(kernel: str, kw: dict) -> str:
    """The ops.CONFIGS role of one launch, from its keyword arguments (as ops picks it)."""
    if kernel == "delta":
        return "delta"
    if kernel == "dkdv" and kw["DQ_MODE"]:
        return "dkdv_owned" if kw["DQ_MODE"] == 2 else "dkdv_fused"
    summary = kw["IS_SUMMARY"] if kernel == "dkdv" else kw["SUM_C"] > 0
    return ops.role(kernel, kw["STEP"], summary)


class Timed:
    """Stands in for a JITFunction: ``fn[grid](...)`` runs it between two recorded CUDA events."""

    def __init__(self, fn, kernel):
        self.fn, self.kernel = fn, kernel

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kw):
            if RECORD is None:
                return launch(*args, **kw)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch(*args, **kw)
            end.record()
            RECORD.append((role_of(self.kernel, kw), start, end))

        return run


for _name, _kernel in (
    ("attn_fwd", "fwd"),
    ("attn_bwd_dq", "dq"),
    ("attn_bwd_dkdv", "dkdv"),
    ("attn_bwd_delta", "delta"),
):
    setattr(kernels, _name, Timed(getattr(kernels, _name), _kernel))


def rec(**kw):
    kw["t"] = round(time.time() - T0, 1)
    print(json.dumps(kw), flush=True)
    with open(os.path.join(OUT, "tune.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")


def set_configs(configs: dict):
    for role, cfg in configs.items():
        ops.CONFIGS[role][64] = tuple(cfg)


def inputs(B, n):
    mk = lambda: torch.randn(B, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    return q, k, v, torch.randn_like(v)


def fwdbwd(pattern, q, k, v, g):
    out = triton_attention(q, k, v, pattern)
    return torch.autograd.grad(out, (q, k, v), g)


def per_role(pattern, tensors, iters):
    """Median per iteration of each role's summed launch time (ms), and of the whole fwd+bwd."""
    global RECORD
    fwdbwd(pattern, *tensors)  # compile
    torch.cuda.synchronize()
    runs = []
    for _ in range(iters):
        RECORD = []
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fwdbwd(pattern, *tensors)
        e.record()
        torch.cuda.synchronize()
        times = {"total": s.elapsed_time(e)}
        for role, a, b in RECORD:
            times[role] = times.get(role, 0.0) + a.elapsed_time(b)
        runs.append(times)
    RECORD = None
    return {r: statistics.median(t[r] for t in runs) for r in runs[0]}


def bench(pattern, tensors):
    with torch.no_grad():
        f = do_bench(lambda: triton_attention(*tensors[:3], pattern), warmup=10, rep=50, return_mode="median")
    fb = do_bench(lambda: fwdbwd(pattern, *tensors), warmup=10, rep=50, return_mode="median")
    return f, fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240, help="seconds for the sweep (the final timings follow)")
    args = ap.parse_args()
    rec(kind="env", card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    committed = {role: ops.CONFIGS[role][64] for role in CANDIDATES}
    data = {name: inputs(B, n) for name, _, B, n, _ in CASES}
    base = {}
    for name, pattern, B, n, _ in CASES:
        base[name] = bench(pattern, data[name])
        rec(kind="committed", case=name, fwd_ms=base[name][0], fwdbwd_ms=base[name][1])
    results = {}  # (variant, case) -> {role: ms}
    for i in range(N_VARIANTS):
        variant = {role: cands[i % len(cands)] for role, cands in CANDIDATES.items()}
        set_configs(variant)
        for name, pattern, B, n, iters in CASES:
            if time.time() - T0 > args.budget:
                rec(kind="skip", variant=i, case=name, why="budget")
                continue
            try:
                results[i, name] = per_role(pattern, data[name], iters)
                rec(kind="variant", variant=i, case=name, ms=results[i, name])
            except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory, registers)
                rec(kind="variant", variant=i, case=name, error=str(e)[:300])
    # winners: least normalized time summed over the cases that use the role
    best = dict(committed)
    for role, cands in CANDIDATES.items():
        score = {}
        for i in range(min(N_VARIANTS, len(cands))):
            for name, *_ in CASES:
                row = results.get((i, name))
                ref = results.get((0, name), {}).get(role)
                if row is None or ref is None or role not in row:
                    continue
                score.setdefault(i, []).append(row[role] / ref)
        full = [i for i in score if len(score[i]) == max(len(v) for v in score.values())]
        if full:
            win = min(full, key=lambda i: sum(score[i]))
            best[role] = cands[win]
            scores = {str(cands[i]): round(sum(score[i]), 3) for i in score}
            rec(kind="role", role=role, winner=cands[win], scores=scores)
    set_configs(best)
    # the winners under each SHORT_RUN_TILES; the least normalized fwd+bwd sum wins
    timed = {}
    for short in SHORT_RUNS:
        ops.SHORT_RUN_TILES = short
        for name, pattern, B, n, _ in CASES:
            try:
                timed[short, name] = bench(pattern, data[name])
            except Exception as e:  # noqa: BLE001 - keep the other measurements
                timed[short, name] = (float("inf"), float("inf"))
                rec(kind="tuned", short_run_tiles=short, case=name, error=str(e)[:300])
                continue
            rec(
                kind="tuned",
                short_run_tiles=short,
                case=name,
                fwd_ms=timed[short, name][0],
                fwdbwd_ms=timed[short, name][1],
                committed_fwd_ms=base[name][0],
                committed_fwdbwd_ms=base[name][1],
            )
    short = min(SHORT_RUNS, key=lambda t: sum(timed[t, name][1] / timed[SHORT_RUNS[0], name][1] for name, *_ in CASES))
    ops.SHORT_RUN_TILES = short
    rows = [(name, n, B, *base[name], *timed[short, name]) for name, pattern, B, n, _ in CASES]
    with open(os.path.join(OUT, "tuned.json"), "w") as fh:
        json.dump({**{role: list(cfg) for role, cfg in best.items()}, "SHORT_RUN_TILES": short}, fh, indent=1)
    print(
        f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"{time.time() - T0:.0f}s"
    )
    print("| case | n | B | committed fwd / fwd+bwd ms | tuned fwd / fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for name, n, B, f0, fb0, f, fb in rows:
        print(f"| {name} | {n} | {B} | {f0:.3f} / {fb0:.3f} | {f:.3f} / {fb:.3f} |")
    for t in SHORT_RUNS:
        print(f"SHORT_RUN_TILES={t}: " + ", ".join(f"{name} {timed[t, name][1]:.3f}" for name, *_ in CASES))
    print("tuned:", json.dumps({**{r: best[r] for r in CANDIDATES}, "SHORT_RUN_TILES": short}))


if __name__ == "__main__":
    main()
