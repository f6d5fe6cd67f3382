"""GPU check of the triton backend in one call: numerics first (the gpu-marked tests under a time
budget, then spot checks of both backward modes), timings of both modes (deterministic=False: fused
dQ with atomics; True: atomic-free) against dense causal SDPA (cuDNN) in the same process, and,
with time left, a few block sizes for the fused dK/dV/dQ kernel.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_triton_check.py [--budget S] [--pytest-budget S]

The fused-dQ backward is off by default (ops.FUSED_DQ); this script turns it on for its own timings;
the gpu tests check it through their fused_dq fixture.

Writes JSON lines to $OUT/triton_check.jsonl (or ./triton_check.jsonl) and prints a table last.
Useful FLOPs count only the pairs the pattern allows: 4·d per pair forward, 3.5x that forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from sparse_transformer import patterns as P
from sparse_transformer.attention.reference import reference_attention
from sparse_transformer.attention.triton import ops, triton_attention

T0 = time.time()
OUT = os.environ.get("OUT", ".")
ROWS: list[dict] = []


def rec(**kw):
    kw["t"] = round(time.time() - T0, 1)
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)
    with open(os.path.join(OUT, "triton_check.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")


def qkv(B, H, n, d, dtype=torch.bfloat16, dv=None, grad=True):
    mk = lambda dd: torch.randn(B, H, n, dd, device="cuda", dtype=dtype, requires_grad=grad)
    return mk(d), mk(d), mk(dv or d)


def useful_pairs(pattern, n, B, H):
    return B * sum(pattern.num_pairs(n, h) for h in range(H))


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: a @ a, warmup=25, rep=100, return_mode="median")
    x = torch.randn(2**28, device="cuda")
    y = torch.empty_like(x)
    tc = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    rec(kind="ceiling", matmul_tflops=2 * 8192**3 / t / 1e9, copy_tbps=2 * x.numel() * 4 / tc / 1e9)
    return 2 * 8192**3 / t / 1e9, 2 * x.numel() * 4 / tc / 1e9


def spot_check(name, pattern, B, H, n, d, dtype, det=False):
    """Output and grads vs the fp32 reference on a few heads (max error relative to max |ref|)."""
    q, k, v = qkv(B, H, n, d, dtype)
    do = torch.randn_like(v)
    out = triton_attention(q, k, v, pattern, deterministic=det)
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(qf, kf, vf, pattern)
    rgrads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    errs = {
        nm: ((a.float() - r).abs().max() / r.abs().max()).item()
        for nm, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *rgrads))
    }
    ok = all(e < (2e-2 if dtype != torch.float32 else 1e-4) for e in errs.values())
    rec(
        kind="spot",
        name=name,
        det=det,
        n=n,
        dtype=str(dtype),
        d=d,
        ok=ok,
        **{f"rel_err_{k}": v for k, v in errs.items()},
    )
    return ok


def dense_cudnn(B, H, n, d, reps=(5, 30)):
    q, k, v = qkv(B, H, n, d)
    g = torch.randn_like(v)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        sd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.no_grad():
            s_f = do_bench(sd, warmup=reps[0], rep=reps[1], return_mode="median")
        s_fb = do_bench(
            lambda: sd().backward(g), warmup=reps[0], rep=reps[1], return_mode="median", grad_to_none=[q, k, v]
        )
    rec(kind="dense", n=n, B=B, H=H, d=d, cudnn_fwd_ms=s_f, cudnn_fwdbwd_ms=s_fb)
    return s_f, s_fb


def bench_triton(name, pattern, B, H, n, d, dets=(False, True), dense=None, reps=(20, 100), tag=""):
    """Forward once (it is the same in both modes), fwd+bwd per backward mode; fresh random inputs."""
    q, k, v = qkv(B, H, n, d)
    g = torch.randn_like(v)
    with torch.no_grad():
        t_f = do_bench(lambda: triton_attention(q, k, v, pattern), warmup=reps[0], rep=reps[1], return_mode="median")
    pairs = useful_pairs(pattern, n, B, H)
    rows = []
    for det in dets:
        fb = lambda det=det: triton_attention(q, k, v, pattern, deterministic=det).backward(g)
        t_fb = do_bench(fb, warmup=reps[0], rep=reps[1], return_mode="median", grad_to_none=[q, k, v])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fb()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        row = {
            "kind": "bench",
            "name": name + tag,
            "det": det,
            "n": n,
            "B": B,
            "H": H,
            "d": d,
            "fwd_ms": t_f,
            "fwdbwd_ms": t_fb,
            "bwd_ms": t_fb - t_f,
            "peak_extra_MiB": peak,
            "useful_fwd_tflops": 4 * d * pairs / t_f / 1e9,
            "useful_fwdbwd_tflops": 3.5 * 4 * d * pairs / t_fb / 1e9,
        }
        if dense:
            row.update(
                cudnn_fwd_ms=dense[0],
                cudnn_fwdbwd_ms=dense[1],
                speedup_fwd=dense[0] / t_f,
                speedup_fwdbwd=dense[1] / t_fb,
            )
        rec(**row)
        rows.append(row)
    return rows


FUSED_SWEEP = [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)]  # the default (32, 128, 4, 3) is timed above


def fused_sweep(cases, deadline):
    """fwd+bwd (deterministic=False) with other block sizes for the fused dK/dV/dQ kernel."""
    keep = ops.CONFIGS["dkdv_fused"][64]
    out = []
    for cfg in FUSED_SWEEP:
        if time.time() > deadline:
            rec(kind="sweep", cfg=cfg, skipped="time")
            continue
        ops.CONFIGS["dkdv_fused"][64] = cfg
        try:
            for name, pattern, B, H, n in cases:
                out += bench_triton(name, pattern, B, H, n, 64, dets=(False,), reps=(10, 50), tag=f" fused{cfg}")
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory, registers)
            rec(kind="sweep", cfg=cfg, error=str(e)[:300])
    ops.CONFIGS["dkdv_fused"][64] = keep
    return out


def run_pytest(budget):
    """The gpu-marked tests in a subprocess with a hard time limit, streamed to a log so a timeout
    still leaves a record. They compile first, which warms the on-disk Triton cache for the timings."""
    log = os.path.join(OUT, "pytest_gpu.log")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_triton.py",
        "-m",
        "gpu",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "--durations=8",
    ]
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=budget, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log) as f:
        lines = f.read().strip().splitlines()
    print("\n".join(lines[-30:]), flush=True)
    rec(kind="pytest_gpu", rc=rc, summary=lines[-1] if lines else "")
    return rc


def table(results, mm, bw, ok, test_rc):
    print(
        f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
        f"bf16 matmul {mm:.0f} TFLOP/s  copy {bw:.2f} TB/s  spot checks {'ok' if ok else 'FAILED'}  "
        f"pytest -m gpu rc={test_rc}"
    )
    print(
        "| case | det | n | B | fwd ms | fwd+bwd ms | bwd ms | useful f / f+b TFLOP/s | cuDNN f / f+b ms "
        "| speed-up f+b | peak extra MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        dn = (
            f"{r['cudnn_fwd_ms']:.2f} / {r['cudnn_fwdbwd_ms']:.2f} | {r['speedup_fwdbwd']:.1f}x"
            if "cudnn_fwd_ms" in r
            else "- | -"
        )
        print(
            f"| {r['name']} | {r['det']} | {r['n']} | {r['B']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
            f"{r['bwd_ms']:.3f} | {r['useful_fwd_tflops']:.0f} / {r['useful_fwdbwd_tflops']:.0f} | {dn} | "
            f"{r['peak_extra_MiB']:.0f} |"
        )
    print(
        "configs d=64:",
        json.dumps({k: v[64] for k, v in ops.CONFIGS.items()}),
        f"total {time.time() - T0:.0f}s",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=320, help="seconds for the whole script")
    ap.add_argument("--pytest-budget", type=float, default=150)
    args = ap.parse_args()
    ops.FUSED_DQ = True
    rec(
        kind="env",
        fused_dq=ops.FUSED_DQ,
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        sms=torch.cuda.get_device_properties(0).multi_processor_count,
    )
    test_rc = run_pytest(args.pytest_budget)
    mm, bw = ceilings()
    s128, f128 = P.strided(128), P.fixed(128, 32)
    spots = [
        spot_check(nm, pat, 1, 2, 8192, 64, torch.bfloat16, det)  # every check runs, then all()
        for det in (False, True)
        for nm, pat in (("strided l=128", s128), ("fixed l=128 c=32", f128))
    ]
    ok = all(spots)
    dense = dense_cudnn(8, 8, 16384, 64)  # same shape for both 16K cases
    results = bench_triton("strided l=128", s128, 8, 8, 16384, 64, dense=dense)
    results += bench_triton("fixed l=128 c=32", f128, 8, 8, 16384, 64, dense=dense)
    table(results, mm, bw, ok, test_rc)  # an early copy, in case the 1M case runs out of time
    if time.time() - T0 < args.budget - 45:
        results += bench_triton("strided l=1024", P.strided(1024), 1, 8, 1048576, 64, reps=(3, 25))
    sweep = fused_sweep(
        [("strided l=128", s128, 8, 8, 16384), ("fixed l=128 c=32", f128, 8, 8, 16384)], deadline=T0 + args.budget - 40
    )
    table(results + sweep, mm, bw, ok, test_rc)


if __name__ == "__main__":
    main()
