"""``sparse-transformer bench tiles``: a tile sweep of the Triton kernels, per launch role (CUDA).

Every launch of a forward + backward is timed on its own: torch.profiler's CUDA kernel durations,
in launch order, read against the call's launch plan (``ops.forward_plan`` / ``ops.backward_plan``
give each launch its tile role, :data:`~sparse_transformer.attention.triton.tiles.ROLES`). Variant
``i`` gives every role its ``i``-th candidate at once (candidate 0 is the committed tile), passed as
a per-call :class:`~sparse_transformer.attention.triton.Tuning`, so one fwd+bwd per variant and case
measures all roles together. A role's winner is the candidate with the least time summed over the
cases that launch it, each case's time divided by its committed time (so the 1M case does not
outvote 16K). The winners then run together under each short-run threshold (when a range term
walks its tiles as one masked loop), timed fwd+bwd with ``do_bench`` against the committed tiles,
and the best of them is checked against the fp32 ``reference`` backend at a small ``n``.

Writes JSON lines (``--out``), prints a table and, last, the winning tiles as a ``tuned`` record: to
adopt them, copy them into ``tiles.TILES`` (and ``SHORT_RUN_TILES``) and run the gpu tests.
Nothing here changes the library's tables.

``--profile`` runs no sweep: it measures the card's bf16 matmul and copy ceilings, then times every
launch of the committed tiles and gives each its TFLOP/s and compulsory GB/s (:func:`launch_work`)
as fractions of those ceilings (``bench_tiles(..., profile=True)``).

``--sass`` needs no GPU: it compiles every launch of the committed tiles for Hopper (sm_90) through
Triton's own pipeline and reads the machine code with Triton's bundled ``cuobjdump``: registers per
thread, local-memory (spill) loads and stores, wgmma instructions and wgmma waits
(:func:`sass_report`). A launch with as many waits as wgmmas had them serialized by ptxas (its
C7515), as the three-loop dK/dV walk once did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from .. import patterns as P
from ..errors import UserError
from ..options import comma_list
from .attention import parse_int, pattern_for, pattern_label

__all__ = [
    "CANDIDATES",
    "add_arguments",
    "bench_tiles",
    "ceilings",
    "launch_work",
    "parse_case",
    "pick_winners",
    "run",
    "sass_report",
]

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, max_registers]) to try per role, after the committed tile (head dim 64,
# bf16; other head dims try the same: a tile that does not fit is recorded as an error).
CANDIDATES: dict[str, list[tuple[int, ...]]] = {
    "fwd": [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
    "fwd_summary": [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3)],
    "fwd_stride": [(64, 32, 4, 3), (128, 32, 4, 3), (32, 32, 2, 3), (128, 64, 8, 3)],
    "dq": [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 2, 3), (128, 32, 8, 3)],
    "dq_summary": [(64, 32, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3)],
    "dq_stride": [(64, 64, 4, 3), (32, 32, 2, 3), (32, 64, 4, 3), (128, 32, 8, 3)],
    "dkdv": [(32, 64, 4, 3), (32, 128, 4, 3), (32, 32, 2, 3), (64, 128, 8, 2)],
    "dkdv_stride": [(16, 64, 4, 3), (16, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3)],
    "dkdv_summary": [(64, 64, 4, 3), (64, 128, 8, 2), (32, 128, 4, 3), (16, 64, 4, 3)],
    "dkdv_owned": [(32, 128, 4, 2, 168), (32, 128, 4, 3, 168), (64, 128, 4, 2), (32, 128, 4, 3)],
    "dkdv_band": [(64, 32, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 2)],
}
SHORT_RUNS = (0, 4, 8, 16)  # short-run thresholds tried with the winners (0: every range walk splits)
DEFAULT_CASES = ("strided:128@16K", "fixed:128:32@16K", "strided:256@64K", "strided:1024@1M")
KERNELS = ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "attn_bwd_delta")


def parse_case(spec: str, batch_tokens: int) -> tuple[str, P.Pattern, int, int]:
    """``PATTERN@N`` (a :func:`~.attention.pattern_for` spec at length N, e.g. ``fixed:128:32@16K``)
    -> ``(label, pattern, n, batch)`` with ``batch = max(1, batch_tokens // n)``."""
    pattern_spec, sep, n_text = spec.partition("@")
    if not sep:
        raise UserError(f"bench tiles: case {spec!r} must look like PATTERN@N, e.g. strided:128@16K")
    try:
        n = parse_int(n_text)
    except ValueError:
        raise UserError(f"bench tiles: case {spec!r}: N must be an integer such as 16384, 16K or 1M") from None
    pattern = pattern_for(pattern_spec, n)
    return f"{pattern_label(pattern)} n={n:,}", pattern, n, max(1, batch_tokens // n)


def candidates(role: str, committed: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The committed tile first, then the role's other candidates."""
    return [committed] + [c for c in CANDIDATES[role] if c != committed]


def pick_winners(
    results: dict[tuple[int, str], dict[str, float]], cands: dict[str, list[tuple[int, ...]]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, dict[str, float]]]:
    """The winning tile per role from ``results[variant, case] = {role: ms}`` (variant ``i`` gave
    every role its ``i``-th candidate, modulo the role's count; variant 0 is committed): the least
    sum over cases of ms / committed ms, among candidates measured on every case that launches the
    role. Returns ``(winners, scores)`` with ``scores[role][str(tile)]`` the sums."""
    cases = sorted({case for _, case in results})
    n_variants = 1 + max((i for i, _ in results), default=0)
    winners, scores = {}, {}
    for role, options in cands.items():
        score = {}
        for i in range(min(n_variants, len(options))):
            for case in cases:
                ms, ref = results.get((i, case), {}).get(role), results.get((0, case), {}).get(role)
                if ms is not None and ref:
                    score.setdefault(i, []).append(ms / ref)
        if not score:
            continue
        most = max(len(v) for v in score.values())
        full = [i for i in score if len(score[i]) == most]
        win = min(full, key=lambda i: sum(score[i]))
        winners[role] = options[win]
        scores[role] = {str(options[i]): round(sum(score[i]), 3) for i in full}
    return winners, scores


def call_launches(pattern, batch: int, heads: int, n: int, head_dim: int, dtype: torch.dtype, tuning=None) -> tuple:
    """Every launch (``ops.Launch``) of one fwd+bwd of the triton backend for ``pattern`` on q, k, v of
    ``[batch, heads, n, head_dim]`` in ``dtype`` (with ``tuning``'s tiles), in launch order: the
    forward plan, then the backward's."""
    from ..attention.triton import ops

    args = (ops.encode(pattern, heads), batch, heads, n, head_dim, head_dim, dtype, tuning)
    return (*ops.forward_plan(*args), *ops.backward_plan(*args).launches)


class _Case:
    """One case's inputs and its fwd+bwd through the triton backend with a given Tuning."""

    def __init__(self, label, pattern, n, batch, heads, head_dim, dtype):
        self.label, self.pattern, self.n, self.batch, self.heads, self.head_dim = (
            label,
            pattern,
            n,
            batch,
            heads,
            head_dim,
        )
        self.dtype = dtype
        mk = lambda: torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        self.q, self.k, self.v = mk(), mk(), mk()
        self.grad = torch.randn_like(self.v)

    def fwdbwd(self, tuning):
        from ..attention.triton import triton_attention

        out = triton_attention(self.q, self.k, self.v, self.pattern, tuning=tuning)
        return torch.autograd.grad(out, (self.q, self.k, self.v), self.grad)

    def launches(self, tuning) -> tuple:
        """Every launch (``ops.Launch``) of one fwd+bwd, in launch order (:func:`call_launches`)."""
        return call_launches(self.pattern, self.batch, self.heads, self.n, self.head_dim, self.dtype, tuning)


def _kernel_ms(fn: Callable[[], object], iters: int) -> list[list[float]]:
    """Durations (ms) of the Triton attention kernels of ``iters`` calls of ``fn``, in launch order,
    from torch.profiler's CUDA activity."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA and e.name.split("(")[0] in KERNELS]
    events.sort(key=lambda e: e.time_range.start)
    return [e.time_range.elapsed_us() / 1e3 for e in events]


def _launch_ms(case: _Case, tuning, iters: int) -> tuple[tuple, list[list[float]]]:
    """The launches of one fwd+bwd of ``case`` with ``tuning`` and, per call of ``iters`` (after one
    untimed call that compiles), each launch's kernel time in ms, in launch order."""
    case.fwdbwd(tuning)  # compile
    torch.cuda.synchronize()
    launches = case.launches(tuning)
    times = _kernel_ms(lambda: case.fwdbwd(tuning), iters)
    k = len(launches)
    if len(times) != iters * k:
        raise RuntimeError(f"profiled {len(times)} attention kernels for {iters} calls of {k} launches")
    return launches, [times[it * k : (it + 1) * k] for it in range(iters)]


def per_role(case: _Case, tuning, iters: int) -> dict[str, float]:
    """Median over ``iters`` fwd+bwd calls of each role's summed kernel time (ms), and ``total``."""
    launches, calls = _launch_ms(case, tuning, iters)
    runs = []
    for call in calls:
        row: dict[str, float] = {}
        for launch, ms in zip(launches, call, strict=True):
            row[launch.role] = row.get(launch.role, 0.0) + ms
        row["total"] = sum(call)
        runs.append(row)
    return {role: statistics.median(r[role] for r in runs) for role in runs[0]}


def _do_bench_ms(case: _Case, tuning) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: case.fwdbwd(tuning), warmup=10, rep=50, return_mode="median")


def check(case: _Case, tuning, n_max: int = 8192) -> dict[str, float]:
    """max |triton - reference| / max |reference| of the output and each gradient, with ``tuning``,
    on a copy of the case at ``min(n, n_max)`` (batch 1, 2 heads; the reference is O(n^2))."""
    from ..attention import sparse_attention

    small = _Case(case.label, case.pattern, min(case.n, n_max), 1, 2, case.head_dim, case.dtype)
    out = sparse_attention(small.q, small.k, small.v, small.pattern, backend="triton", tuning=tuning)
    got = torch.autograd.grad(out, (small.q, small.k, small.v), small.grad)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (small.q, small.k, small.v))
    ref = sparse_attention(qf, kf, vf, small.pattern, backend="reference")
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), small.grad.float())
    return {
        name: ((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
        for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *ref_grads))
    }


def _recorder(out_jsonl: str | None, t0: float) -> Callable[..., None]:
    """``rec(**row)``: the row, stamped with ``t`` (seconds since ``t0``), as one JSON line on stdout
    and appended to ``out_jsonl`` when given."""

    def rec(**row):
        row["t"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        if out_jsonl:
            with open(out_jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    return rec


def bench_tiles(
    cases: Sequence[str] = DEFAULT_CASES,
    batch_tokens: int = 131072,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str = "bf16",
    iters: int = 10,
    budget_s: float = 240.0,
    out_jsonl: str | None = None,
    profile: bool = False,
) -> dict:
    """Run the sweep (module docstring); returns ``{"tiles": {role: tile}, "short_run_tiles": k,
    "rows": [...]}`` with the committed and tuned fwd+bwd times per case. With ``profile`` no sweep:
    the card's ceilings and every launch of the committed tiles against them, ``{"launches": rows}``
    (:func:`format_launches`). Raises UserError without CUDA."""
    import triton

    from ..attention.triton import Tuning, tile_config, tiles
    from ..runtime import DTYPES

    if not torch.cuda.is_available():
        raise UserError("bench tiles times the Triton kernels on a GPU; it needs CUDA")
    t0 = time.time()
    torch_dtype = DTYPES[dtype]
    rec = _recorder(out_jsonl, t0)
    rec(
        kind="env",
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        head_dim=head_dim,
        dtype=dtype,
        heads=heads,
    )
    if profile:
        return {"launches": _profile_launches(cases, batch_tokens, heads, head_dim, torch_dtype, iters, rec)}
    data = [_Case(*parse_case(c, batch_tokens), heads, head_dim, torch_dtype) for c in cases]
    committed = {role: tile_config(role, head_dim, torch_dtype).as_tuple() for role in CANDIDATES}
    cands = {role: candidates(role, committed[role]) for role in CANDIDATES}
    base = {}
    for c in data:
        base[c.label] = _do_bench_ms(c, None)
        rec(kind="committed", case=c.label, fwdbwd_ms=base[c.label])
    results: dict[tuple[int, str], dict[str, float]] = {}
    for i in range(max(len(v) for v in cands.values())):
        tuning = Tuning({role: options[i % len(options)] for role, options in cands.items()})
        for c in data:
            if time.time() - t0 > budget_s:
                rec(kind="variant", variant=i, case=c.label, skipped="budget")
                continue
            try:
                results[i, c.label] = per_role(c, tuning, iters)
                rec(kind="variant", variant=i, case=c.label, ms=results[i, c.label])
            except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory, registers) is a result
                rec(
                    kind="variant",
                    variant=i,
                    case=c.label,
                    error=str(e).strip().splitlines()[0][:300] if str(e) else type(e).__name__,
                )
    winners, scores = pick_winners(results, cands)
    for role, tile in winners.items():
        rec(kind="role", role=role, winner=tile, committed=committed[role], scores=scores[role])
    best = {**committed, **winners}
    timed = {}
    for short in SHORT_RUNS:
        tuning = Tuning(best, short_run_tiles=short)
        for c in data:
            try:
                timed[short, c.label] = _do_bench_ms(c, tuning)
            except Exception as e:  # noqa: BLE001 - keep the other measurements
                timed[short, c.label] = math.inf
                rec(kind="tuned", short_run_tiles=short, case=c.label, error=str(e)[:300])
                continue
            rec(
                kind="tuned",
                short_run_tiles=short,
                case=c.label,
                fwdbwd_ms=timed[short, c.label],
                committed_fwdbwd_ms=base[c.label],
            )
    short = min(SHORT_RUNS, key=lambda s: sum(timed[s, c.label] / base[c.label] for c in data))
    tuning = Tuning(best, short_run_tiles=short)
    for c in data:
        errors = check(c, tuning)
        rec(
            kind="check",
            case=c.label,
            ok=max(errors.values()) < (1e-4 if dtype == "fp32" else 2e-2),
            **{f"rel_err_{k}": v for k, v in errors.items()},
        )
    rows = [
        {"case": c.label, "batch": c.batch, "committed_ms": base[c.label], "tuned_ms": timed[short, c.label]}
        for c in data
    ]
    result = {"tiles": {r: list(t) for r, t in best.items()}, "short_run_tiles": short, "rows": rows}
    rec(kind="result", tiles=result["tiles"], short_run_tiles=short, committed_short_run_tiles=tiles.SHORT_RUN_TILES)
    return result


# tile matmuls per (query, key) pair of each kernel; an owned dK/dV launch adds dS·K for dQ
MATMULS = {"attn_fwd": 2, "attn_bwd_dq": 3, "attn_bwd_dkdv": 4, "attn_bwd_delta": 0}


def launch_work(launch, n: int, head_dim: int, itemsize: int, batch_heads: int) -> tuple[int, int]:
    """``(FLOPs, bytes)`` of one launch of a plan (``ops.Launch``) at length ``n``: FLOPs are the
    pairs its terms allow (``Term.keys_per_query``, over the ``B·heads`` rows of its grid; an owned
    band launch, the pairs of the keys of its chunks) times 2·head_dim per tile matmul (``MATMULS``);
    bytes are compulsory traffic, each tensor the launch reads or writes counted whole, once (q, k,
    v, o, dO, dq, dk, dv of ``itemsize`` bytes per element, the fp32 lse and delta; an earlier
    launch's output it adds onto counts twice). ``batch_heads`` is B·H, for the delta kernel (its
    grid is over rows)."""
    import numpy as np

    meta, kind = launch.meta, launch.kernel
    rows = batch_heads if kind == "attn_bwd_delta" else launch.grid[1]
    t = rows * n * head_dim * itemsize  # one [rows, n, d] tensor
    stat = rows * n * 4  # one fp32 statistic per row
    if kind == "attn_bwd_delta":
        return 0, 2 * t + stat
    i = np.arange(n, dtype=np.int64)
    if meta.get("CHUNK") and meta["CHUNK_STEP"] == 2:  # an owned band launch: the even or odd chunks of keys,
        # each read by min(w, n - j) queries (CHUNK_STEP 1, whole residue classes: every key, below)
        chunk = meta["CHUNK"] * meta["BLOCK_N"]
        (band,) = launch.terms
        held = (i // chunk) % 2 == meta["PARITY"]
        pairs = rows * int(np.minimum(band.window, n - i)[held].sum())
    else:
        pairs = rows * sum(int(term.keys_per_query(i).sum()) for term in launch.terms)
    owned = bool(meta.get("OWNED"))
    flops = pairs * (MATMULS[kind] + owned) * 2 * head_dim
    if kind == "attn_fwd":  # q, k, v in; o, lse out (and in, continuing an earlier pass)
        moved = 3 * t + t + stat + (t + stat if meta["INIT_FROM_OUT"] else 0)
    elif kind == "attn_bwd_dq":  # q, k, v, dO, lse in; o in and delta out (first) or delta in; dq out (+ in)
        moved = 4 * t + stat + (t + stat) + t + (0 if meta["FIRST"] else t)
    else:  # q, k, v, dO, lse, delta in; dk, dv out (+ in); owned: dq in and out
        moved = 4 * t + 2 * stat + 2 * t + (2 * t if meta["ACCUMULATE"] else 0) + (2 * t if owned else 0)
    return flops, moved


def ceilings(device: str = "cuda") -> dict[str, float]:
    """The card's bf16 matmul TFLOP/s (8192³, ``do_bench`` median) and copy bandwidth in GB/s (read +
    write of a 1 GiB tensor), measured now, for the launch table's fractions."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    src = torch.empty(1 << 29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return {
        "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9,
        "copy_gbps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
    }


def _profile_launches(
    cases: Sequence[str], batch_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, iters: int, rec
) -> list[dict]:
    """``bench tiles --profile`` (:func:`bench_tiles` with ``profile=True``): the card's ceilings,
    then every launch of one fwd+bwd per case with the committed tiles: median kernel ms over
    ``iters`` calls, its FLOPs and compulsory bytes (:func:`launch_work`) as TFLOP/s and GB/s, and
    both as fractions of the ceilings. Each row goes to ``rec``; returns them."""
    rows = [{"kind": "ceilings", **ceilings()}]
    rec(**rows[0])
    for spec in cases:
        c = _Case(*parse_case(spec, batch_tokens), heads, head_dim, dtype)
        launches, calls = _launch_ms(c, None, iters)
        for k, launch in enumerate(launches):
            ms = statistics.median(call[k] for call in calls)
            flops, moved = launch_work(launch, c.n, head_dim, c.q.element_size(), c.batch * heads)
            tflops, gbps = flops / ms / 1e9, moved / ms / 1e6
            row = {
                "kind": "launch",
                "case": c.label,
                "batch": c.batch,
                "launch": k,
                "role": launch.role,
                "ms": ms,
                "tflops": tflops,
                "gbps": gbps,
                "matmul_fraction": tflops / rows[0]["matmul_tflops"],
                "copy_fraction": gbps / rows[0]["copy_gbps"],
            }
            rows.append(row)
            rec(**row)
    return rows


def _compile_for_hopper(fn, args: tuple, meta: dict):
    """The cubin of one launch (kernel ``fn``, its arguments and constexprs) compiled for sm_90 on
    any machine: what ``JITFunction.run`` does before a launch, with a target instead of a device.
    Raises UserError when this Triton's compile internals differ (written against triton 3.6)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile, make_backend
        from triton.runtime.jit import create_function_from_signature

        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        kwargs = {**meta, "debug": False, "instrumentation_mode": ""}
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
            *args, **kwargs
        )
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    except (ImportError, AttributeError, TypeError) as e:
        raise UserError(f"bench tiles --sass: this Triton's compile internals differ from triton 3.6's ({e})") from None
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__).asm["cubin"]


_QK_SCALE = 0.18  # the placeholder launches' qk_scale (d 64's 0.125·log2(e))


def _launch_args(launch, B: int, H: int, n: int, d: int, dtype: torch.dtype) -> tuple:
    """Placeholder arguments of one launch (CPU tensors whose memory is never touched; the model's
    positions-major layout of :func:`ops.heads_like`): what the compiler specializes on is their
    dtypes, the strides and the integer arguments."""
    from ..attention.triton import ops

    q = torch.empty(B, n, H, d, dtype=dtype).transpose(1, 2)
    stats = torch.empty(B, H, n)
    return ops.launch_args(launch, q, q, q, q, stats, _QK_SCALE, 0.125, (q, q, q, q, stats))


def sass_report(
    cases: Sequence[str] = DEFAULT_CASES,
    batch_tokens: int = 131072,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str = "bf16",
    tuning=None,
    rec: Callable[..., None] | None = None,
) -> list[dict]:
    """Every launch of one fwd+bwd of each case (``PATTERN@N``), compiled for sm_90 without a GPU:
    one row per launch with ``registers`` per thread, ``stack_bytes``, ``local_loads`` /
    ``local_stores`` (spill instructions), ``wgmma`` instructions and ``wgmma_waits``, and
    ``serialized`` (as many waits as wgmmas: ptxas issued every wgmma synchronously). Each row goes
    to ``rec`` too. Raises UserError under ``TRITON_INTERPRET=1`` (the kernels are then built for the
    interpreter), without Triton's NVIDIA backend or its ``cuobjdump``."""
    from ..attention.triton import kernels, ops
    from ..runtime import DTYPES

    if ops.INTERPRET:
        raise UserError("bench tiles --sass compiles the kernels for the GPU: run it without TRITON_INTERPRET=1")
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        raise UserError("bench tiles --sass needs Triton's NVIDIA backend (pip install triton)") from None
    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise UserError(f"bench tiles --sass: Triton's cuobjdump is missing ({cuobjdump}); reinstall triton")
    torch_dtype = DTYPES[dtype]
    rows = []
    for spec in cases:
        label, pattern, n, B = parse_case(spec, batch_tokens)
        for k, launch in enumerate(call_launches(pattern, B, heads, n, head_dim, torch_dtype, tuning)):
            args = _launch_args(launch, B, heads, n, head_dim, torch_dtype)
            constexprs = {**ops.call_constexprs(launch.kernel, _QK_SCALE), **launch.meta}
            cubin = _compile_for_hopper(getattr(kernels, launch.kernel), args, constexprs)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "launch.cubin")
                with open(path, "wb") as f:
                    f.write(cubin)
                usage = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True
                ).stdout
                sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            wgmma, waits = sass.count("HGMMA"), sass.count("WARPGROUP.DEPBAR")
            meta = launch.meta
            row = {
                "kind": "sass",
                "case": label,
                "launch": k,
                "role": launch.role,
                "tile": [
                    meta.get("BLOCK_M"),
                    meta.get("BLOCK_N"),
                    meta.get("num_warps"),
                    meta.get("num_stages"),
                    meta.get("maxnreg", 0),
                ],
                "registers": int(found.group(1)) if found else None,
                "stack_bytes": int(found.group(2)) if found else None,
                "local_loads": len(re.findall(r"\bLDL\b", sass)),
                "local_stores": len(re.findall(r"\bSTL\b", sass)),
                "wgmma": wgmma,
                "wgmma_waits": waits,
                "serialized": wgmma > 0 and waits >= wgmma,
            }
            rows.append(row)
            if rec:
                rec(**row)
    return rows


def format_sass(rows: Sequence[dict]) -> str:
    """The table of ``bench tiles --sass`` (its rows)."""
    lines = [
        "| case | # | role | tile | registers | stack B | spill ld/st | wgmma | waits | serialized |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tile = "x".join(str(x) for x in r["tile"][:2]) + f", {r['tile'][2]} warps" if r["tile"][0] else "-"
        lines.append(
            f"| {r['case']} | {r['launch']} | {r['role']} | {tile} | {r['registers']} | {r['stack_bytes']} | "
            f"{r['local_loads']}/{r['local_stores']} | {r['wgmma']} | {r['wgmma_waits']} | "
            f"{'**yes**' if r['serialized'] else 'no'} |"
        )
    return "\n".join(lines)


def format_launches(rows: Sequence[dict]) -> str:
    """The launch table of ``bench tiles --profile`` (its rows)."""
    ceil = next(r for r in rows if r["kind"] == "ceilings")
    lines = [
        f"ceilings (same call): {ceil['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {ceil['copy_gbps']:.0f} GB/s copy",
        "| case | # | role | ms | TFLOP/s | % matmul | GB/s | % copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "launch":
            lines.append(
                f"| {r['case']} | {r['launch']} | {r['role']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                f"{100 * r['matmul_fraction']:.0f} % | {r['gbps']:.0f} | {100 * r['copy_fraction']:.0f} % |"
            )
    return "\n".join(lines)


def profiler_range(cases: Sequence[str], batch_tokens: int, heads: int, head_dim: int, dtype: str) -> list[dict]:
    """``bench tiles --ncu-range``: per case, one untimed fwd+bwd with the committed tiles (Triton
    compiles its launches), then one more inside a CUDA profiler range (``cudaProfilerStart`` /
    ``cudaProfilerStop``), so that a counter profiler started with ``--profile-from-start off``
    (Nsight Compute: ``ncu --profile-from-start off -k regex:attn_ ...``) sees exactly the launches of
    one fwd+bwd per case, compiled and warm. Times nothing itself. Returns one row per case: its
    label, batch and launches (kernel and role, in launch order). Raises UserError without CUDA."""
    if not torch.cuda.is_available():
        raise UserError("bench tiles --ncu-range runs the Triton kernels on a GPU; it needs CUDA")
    from ..runtime import DTYPES

    rows = []
    for spec in cases:
        case = _Case(*parse_case(spec, batch_tokens), heads, head_dim, DTYPES[dtype])
        case.fwdbwd(None)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        try:
            case.fwdbwd(None)
            torch.cuda.synchronize()
        finally:
            torch.cuda.cudart().cudaProfilerStop()
        launches = [f"{launch.kernel}:{launch.role}" for launch in case.launches(None)]
        rows.append({"kind": "ncu_range", "case": case.label, "batch": case.batch, "launches": launches})
        del case
        torch.cuda.empty_cache()
    return rows


# Nsight Compute metrics of the counter table (``--page raw`` names; ``--print-units base``):
# column -> (metric, scale)
NCU_METRICS = {
    "ms": ("gpu__time_duration.sum", 1e-6),
    "sm_mhz": ("smsp__cycles_elapsed.avg.per_second", 1e-6),
    "issue_busy_pct": ("sm__inst_executed.sum.pct_of_peak_sustained_elapsed", 1.0),
    "tensor_pipe_pct": ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", 1.0),
    "xu_pipe_pct": ("sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active", 1.0),
    "l2_throughput_pct": ("lts__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    "dram_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    "registers": ("launch__registers_per_thread", 1.0),
    "warps_per_scheduler": ("smsp__warps_active.avg.per_cycle_active", 1.0),
}
_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def ncu_summary(
    csv_path: str,
    cases: Sequence[str],
    batch_tokens: int = 131072,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str = "bf16",
) -> list[dict]:
    """The attention launches of an Nsight Compute report exported as ``ncu --import R.ncu-rep --csv
    --page raw --print-units base`` (a run of ``bench tiles --ncu-range`` over ``cases``), one row per
    launch: its case and role (from the launch plans, in order), time, SM clock, issue slots busy,
    tensor and XU (exp2) pipes active, L2 and DRAM throughput (% of peak), registers, warps per
    scheduler and the three largest stall reasons in cycles per issued instruction ("selected", the
    issue itself, left out). No GPU needed. Raises UserError for a file that is not such an export or
    whose kernel count differs from the plans' launch count."""
    import csv

    from ..runtime import DTYPES

    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except OSError as e:
        raise UserError(f"bench tiles --ncu-csv: cannot read {csv_path} ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error):
        table = []  # not a text CSV: refused below as lacking the metrics
    header = table[0] if table else []
    col = {name: i for i, name in enumerate(header)}
    missing = [m for m in ("Kernel Name", *(m for m, _ in NCU_METRICS.values())) if m not in col]
    if missing:
        raise UserError(
            f"bench tiles --ncu-csv: {csv_path} lacks {', '.join(missing[:3])}: export the report with "
            "ncu --import R.ncu-rep --csv --page raw --print-units base (from a --set full profile)"
        )
    rows = [r for r in table[1:] if len(r) == len(header) and r[col["Kernel Name"]].startswith("attn_")]
    labels = []
    for spec in cases:
        label, pattern, n, batch = parse_case(spec, batch_tokens)
        plan = call_launches(pattern, batch, heads, n, head_dim, DTYPES[dtype])
        labels += [(label, i, launch) for i, launch in enumerate(plan)]
    if len(rows) != len(labels):
        raise UserError(
            f"bench tiles --ncu-csv: {csv_path} holds {len(rows)} attention kernels, the plans of "
            f"{', '.join(cases)} launch {len(labels)}: give the --cases (and --heads, --head-dim, --dtype) "
            "of the --ncu-range run"
        )

    def number(row, metric):
        text = row[col[metric]].replace(",", "")
        try:
            return float(text)
        except ValueError:
            return None

    stalls = [(m.group(1), name) for name in header if (m := _STALL.match(name))]
    out = []
    for row, (label, i, launch) in zip(rows, labels, strict=True):
        kernel = row[col["Kernel Name"]].split("(")[0]
        if kernel != launch.kernel:
            raise UserError(
                f"bench tiles --ncu-csv: kernel {i} of {label} is {kernel} in {csv_path}, the plan launches "
                f"{launch.kernel}: give the --cases of the --ncu-range run, in its order"
            )
        r = {"kind": "ncu", "case": label, "launch": i, "role": launch.role, "kernel": kernel}
        for key, (metric, scale) in NCU_METRICS.items():
            value = number(row, metric)
            r[key] = None if value is None else round(value * scale, 4)
        ranked = sorted(
            ((number(row, name) or 0.0, reason) for reason, name in stalls if reason != "selected"), reverse=True
        )
        r["stalls_per_issue"] = {reason: round(v, 2) for v, reason in ranked[:3]}
        out.append(r)
    return out


def format_ncu(rows: Sequence[dict]) -> str:
    """The counter table of ``bench tiles --ncu-csv`` (its rows)."""

    def num(v, spec: str, unit: str = "") -> str:
        return "" if v is None else f"{v:{spec}}{unit}"

    pct = lambda v: num(v, ".0f", " %")
    lines = [
        "| case | # | role | ms | issue slots | tensor pipe | exp2 (XU) | L2 | DRAM | regs | warps / scheduler "
        "| largest stalls (cycles per issue) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stalls = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["stalls_per_issue"].items())
        lines.append(
            f"| {r['case']} | {r['launch']} | {r['role']} | {num(r['ms'], '.3f')} | {pct(r['issue_busy_pct'])} | "
            f"{pct(r['tensor_pipe_pct'])} | {pct(r['xu_pipe_pct'])} | {pct(r['l2_throughput_pct'])} | "
            f"{pct(r['dram_pct'])} | {num(r['registers'], '.0f')} | {num(r['warps_per_scheduler'], '.1f')} | {stalls} |"
        )
    return "\n".join(lines)


def format_table(result: dict) -> str:
    lines = ["| case | B | committed fwd+bwd ms | tuned fwd+bwd ms | speed-up |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['committed_ms']:.3f} | {r['tuned_ms']:.3f} | "
            f"{r['committed_ms'] / r['tuned_ms']:.3f}x |"
        )
    lines.append(f"tuned: {json.dumps({'tiles': result['tiles'], 'short_run_tiles': result['short_run_tiles']})}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``sparse-transformer bench tiles``."""
    p.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma-separated PATTERN@N, PATTERN as for bench attention (strided[:l], fixed[:l[:c]], local[:w], dense)",
    )
    p.add_argument("--batch-tokens", type=parse_int, default=131072, help="B = batch_tokens // n (default 131072)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--iters", type=int, default=10, help="profiled fwd+bwd calls per variant and case")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the variants (the final timings follow)")
    p.add_argument("--out", default=None, help="append JSON lines to this file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="no sweep: every launch of the committed tiles with its TFLOP/s and GB/s against the card's "
        "matmul and copy ceilings measured in the same call",
    )
    p.add_argument(
        "--sass",
        action="store_true",
        help="no GPU needed: compile every launch of the committed tiles for sm_90 and report its registers, "
        "spills, wgmma instructions and waits (a launch with a wait per wgmma is serialized)",
    )
    p.add_argument(
        "--ncu-csv",
        default=None,
        metavar="CSV",
        help="no GPU needed: the per-launch counter table of an ncu report of a --ncu-range run over the same "
        "--cases, exported with ncu --import R.ncu-rep --csv --page raw --print-units base > CSV",
    )
    p.add_argument(
        "--ncu-range",
        action="store_true",
        help="no timing: one warm fwd+bwd per case inside a CUDA profiler range, for a counter profiler "
        "started with --profile-from-start off (ncu --profile-from-start off -k regex:attn_ sparse-transformer "
        "bench tiles --ncu-range ...)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparse-transformer bench tiles``: JSON lines, then the table."""
    cases = comma_list(args.cases)
    for c in cases:
        parse_case(c, args.batch_tokens)  # refuse a bad case before any GPU work
    modes = [name for name in ("sass", "profile", "ncu_range", "ncu_csv") if getattr(args, name)]
    if len(modes) > 1:
        raise UserError(
            f"bench tiles: {' and '.join('--' + m.replace('_', '-') for m in modes)} are separate modes; give one"
        )
    if args.ncu_csv:
        rec = _recorder(args.out, time.time())
        rows = ncu_summary(args.ncu_csv, cases, args.batch_tokens, args.heads, args.head_dim, args.dtype)
        for row in rows:
            rec(**row)
        print()
        print(format_ncu(rows))
        return 0
    if args.ncu_range:
        rec = _recorder(args.out, time.time())
        for row in profiler_range(cases, args.batch_tokens, args.heads, args.head_dim, args.dtype):
            rec(**row)
        return 0
    if args.sass:
        rec = _recorder(args.out, time.time())
        rows = sass_report(cases, args.batch_tokens, args.heads, args.head_dim, args.dtype, rec=rec)
        print()
        print(format_sass(rows))
        return 0
    result = bench_tiles(
        cases, args.batch_tokens, args.heads, args.head_dim, args.dtype, args.iters, args.budget, args.out, args.profile
    )
    print()
    print(format_launches(result["launches"]) if args.profile else format_table(result))
    return 0
