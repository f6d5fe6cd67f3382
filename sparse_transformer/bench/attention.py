"""``sparse-transformer bench attention``: attention backends x patterns x lengths, fwd and fwd+bwd.

For every length ``n`` the batch is ``B = max(1, batch_tokens // n)`` and the inputs are random
``q, k, v [B, heads, n, head_dim]`` (never zeros) that require grad. Two modes:

* ``fwd``:    one forward pass (autograd records it, as in training);
* ``fwdbwd``: forward plus ``torch.autograd.grad`` of all three inputs for a random output gradient.

Reported per case (one JSON line each, then a markdown table):

* ``ms``: median time. CUDA: ``triton.testing.do_bench(return_mode="median")`` after a warm-up
  call (compilation, autotuning; the dense SDPA baselines skip it). A call slower than 0.2 s is
  repeated, and the first dropped when the second is less than half of it (a cold start); a case
  that stays above 0.2 s is the median of up to 3 calls, of 2 above 2 s (dense attention at n = 1M
  takes ~10 s fwd+bwd). CPU: the median of ``time.perf_counter`` around at least 3 calls after a
  first, untimed one.
* ``useful_tflops``: FLOPs of the allowed pairs only, ``4 · head_dim`` per pair forward and 3.5x
  that for fwd+bwd, pairs from ``pattern.num_pairs(n, h)`` summed over heads and batch.
* ``speedup_vs``: this case's speed over each baseline measured in the same run at the same ``n``
  and mode (baselines run first): dense causal SDPA with the cuDNN backend (``sdpa_cudnn``) and the flash backend
  (``sdpa_flash``) on CUDA, PyTorch's default ``sdpa`` (CPU), and the ``flex`` (composed
  FlexAttention) and ``factorized`` backends on the same pattern.
* ``peak_mib``: memory above what the inputs already held, during one call. CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: each case runs in a
  fresh process; the peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the
  first call minus the resident set just before it (``/proc/self/statm``), inputs already built.
* ``error``: set instead of ``ms`` when a backend fails (out of memory, unsupported, timeout) or is
  skipped (``skipped: ...``, e.g. a CUDA-only backend on CPU or the Triton backend not installed).

The dense baselines (``sdpa*``) compute dense causal attention whatever the pattern; they run once
per ``n`` and appear with pattern ``dense``. Backends ``reference``, ``factorized``, ``triton``,
``flex``, ``sdpa`` and ``auto`` go through :func:`sparse_transformer.attention.sparse_attention`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import patterns as P
from ..attention import BACKENDS, sparse_attention
from ..config import Precision, literal_values
from ..errors import UserError
from ..options import comma_list
from ..paths import check_output_file
from ..runtime import DTYPES, dtype_name, resolve_device

DENSE_BACKENDS = ("sdpa_cudnn", "sdpa_flash", "sdpa")
ALL_BACKENDS = tuple(b for b in BACKENDS if b != "sdpa") + DENSE_BACKENDS
BASELINES = ("sdpa_cudnn", "sdpa_flash", "sdpa", "flex", "factorized")
_BASELINE_TITLES = {
    "sdpa_cudnn": "x cuDNN",
    "sdpa_flash": "x flash",
    "sdpa": "x sdpa",
    "flex": "x flex",
    "factorized": "x factorized",
}
_CUDA_ONLY = ("triton", "flex", "sdpa_cudnn", "sdpa_flash")
MODES = ("fwd", "fwdbwd")
DEFAULTS = {
    "cuda": {
        "backends": ("triton", "flex", "factorized", "sdpa_cudnn", "sdpa_flash"),
        "ns": (4096, 16384, 65536, 262144, 1048576),
        "batch_tokens": 131072,
    },
    "cpu": {"backends": ("factorized", "sdpa"), "ns": (1024, 4096), "batch_tokens": 4096},
}

__all__ = ["add_arguments", "bench_attention", "format_table", "parse_int", "pattern_for", "run"]


# --------------------------------------------------------------------------------------------
# Patterns and FLOP counts
# --------------------------------------------------------------------------------------------


def pattern_for(spec: str | P.Pattern, n: int) -> P.Pattern:
    """The pattern a spec names at length ``n``.

    ``strided[:l]``, ``fixed[:l[:c]]``, ``local[:w]``, ``dense``; without ``l``: strided uses
    ``l = sqrt(n)`` rounded to a power of two (64, 128, ..., 1024 for n = 4K ... 1M), fixed uses
    ``l = 128`` for ``n <= 16,384`` else 256 and ``c = 32``, local ``w = 256``. A pattern object is
    returned as it is.
    """
    if isinstance(spec, P.Pattern):
        return spec
    name, *args = spec.strip().split(":")
    try:
        ints = [parse_int(a) for a in args]
    except ValueError:
        raise UserError(
            f"pattern {spec!r}: the values after ':' must be integers, e.g. strided:256 or fixed:128:32"
        ) from None
    try:
        if name == "dense" and not ints:
            return P.dense()
        if name == "strided" and len(ints) <= 1:
            return P.strided(ints[0] if ints else 2 ** round(math.log2(math.sqrt(n))))
        if name == "fixed" and len(ints) <= 2:
            l = ints[0] if ints else (128 if n <= 16384 else 256)
            return P.fixed(l, ints[1] if len(ints) > 1 else 32)
        if name == "local" and len(ints) <= 1:
            return P.local(ints[0] if ints else 256)
    except ValueError as e:
        raise UserError(f"pattern {spec!r}: {e}") from None
    raise UserError(f"unknown pattern spec {spec!r}; use strided[:l], fixed[:l[:c]], local[:w] or dense")


def pattern_label(pattern: P.Pattern) -> str:
    """A short name for tables: ``strided l=256``, ``fixed l=128 c=32``, ``dense``."""
    if isinstance(pattern, P.NamedPattern):
        if pattern.name == "dense":
            return "dense"
        label = f"{pattern.name} l={pattern.stride}"
        if pattern.name == "fixed":
            label += f" c={pattern.c}" + (f" v={pattern.num_verts}" if pattern.num_verts > 1 else "")
        return label + ("" if pattern.part == "both" else f" {pattern.part}")
    return pattern.describe()


def useful_pairs(pattern: P.Pattern, n: int, heads: int, batch: int) -> int:
    """Allowed (i, j) pairs over all heads and the batch: the work a pattern really asks for."""
    return batch * sum(pattern.num_pairs(n, hs[0]) * len(hs) for _, hs in pattern.head_groups(heads))


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measurement: a backend on a pattern at one length, in one mode."""

    backend: str
    pattern: P.Pattern
    n: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    mode: str

    def record(self, **fields) -> dict:
        """The JSON-line record of this case with the measured ``fields``."""
        rec = {k: v for k, v in asdict(self).items() if k != "pattern"}
        rec.update(pattern=pattern_label(self.pattern), pattern_spec=self.pattern.describe())
        rec.update(fields)
        return rec


def _attend_fn(backend: str, pattern: P.Pattern) -> Callable:
    """``f(q, k, v) -> out`` for a backend name (the dense baselines pin an SDPA kernel)."""
    if backend in ("sdpa_cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = SDPBackend.CUDNN_ATTENTION if backend == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def attend(q, k, v):
            with sdpa_kernel([kernel]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return attend
    return lambda q, k, v: sparse_attention(q, k, v, pattern, backend=backend)


def _case_fn(case: Case) -> Callable[[], object]:
    """The timed callable of ``case`` on fresh random inputs ``[B, H, n, d]``."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    torch.manual_seed(0)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    attend = _attend_fn(case.backend, case.pattern)
    if case.mode == "fwd":
        return lambda: attend(q, k, v)
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)


def _cuda_call_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _measure_cuda(case: Case) -> dict:
    from triton.testing import do_bench

    fn = _case_fn(case)
    if case.backend not in DENSE_BACKENDS:
        fn()  # compilation, autotuning, block masks: not timed, not counted as memory
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = [_cuda_call_ms(fn)]
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    if times[0] > 200:
        # Slow, or a cold start: cuDNN's first fwd+bwd in a process took ~3 s at every n on an H200
        # (2026-11-28), so a slow first call is repeated and dropped when the second is much faster.
        times.append(_cuda_call_ms(fn))
        if times[1] < 0.5 * times[0]:
            times = times[1:]
    if times[-1] <= 200:
        ms, reps = do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"
    else:  # e.g. dense attention at n = 1M (~10 s fwd+bwd): few calls; 3 when each is under 2 s
        while times[-1] <= 2000 and len(times) < 3:
            times.append(_cuda_call_ms(fn))
        ms, reps = statistics.median(times), len(times)
    return {"ms": ms, "reps": reps, "peak_mib": peak_mib, "peak_method": "torch.cuda.max_memory_allocated"}


def _rss_mib() -> float:
    """The current resident set of this process (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _maxrss_mib()


def _maxrss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # bytes on macOS, KiB on Linux


def _measure_cpu(case: Case, min_total_s: float = 1.0, max_reps: int = 20) -> dict:
    """Run in a fresh process: the first call gives the peak-RSS growth, later calls the time."""
    fn = _case_fn(case)
    gc.collect()
    before = _rss_mib()
    fn()
    peak_mib = max(0.0, _maxrss_mib() - before)
    times = []
    while len(times) < 3 or (sum(times) < min_total_s * 1e3 and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "ms": statistics.median(times),
        "reps": len(times),
        "peak_mib": peak_mib,
        "peak_method": "ru_maxrss growth in a fresh process",
    }


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    kind = (
        "out of memory"
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in first.lower()
        else type(e).__name__
    )
    return f"{kind}: {first}"[:300]


def _run_case(case: Case) -> dict:
    """Measure ``case`` in this process; failures become an ``error`` field."""
    try:
        fields = _measure_cuda(case) if case.device.startswith("cuda") else _measure_cpu(case)
    except Exception as e:  # noqa: BLE001 - a failing backend is a result, recorded in the table
        fields = {"error": _error_text(e)}
    gc.collect()
    if case.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return fields


def _case_worker(case: Case, conn) -> None:
    conn.send(_run_case(case))
    conn.close()


def _run_isolated(case: Case, timeout_s: float | None) -> dict:
    """Run ``case`` in a fresh spawned process so its peak RSS is its own (CPU memory method)."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_case_worker, args=(case, send), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout_s):
            return recv.recv()
        return {"error": f"timeout: no result after {timeout_s:g} s"}
    except EOFError:
        proc.join(5)
        return {"error": f"worker process died (exit code {proc.exitcode}; out of memory?)"}
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _skip_reason(backend: str, n: int, device: torch.device, max_n: dict[str, int]) -> str | None:
    if backend in _CUDA_ONLY and device.type != "cuda":
        return f"skipped: {backend} needs CUDA"
    if backend in max_n and n > max_n[backend]:
        return f"skipped: n > {max_n[backend]} (--max-n)"
    if backend == "triton":
        try:
            from ..attention import triton as _triton  # noqa: F401  (imported lazily: CUDA-only code)
        except ImportError as e:
            return f"skipped: triton backend not available ({e})"
    return None


def _add_speedups(records: list[dict], rec: dict) -> None:
    """Set ``rec["speedup_vs"][baseline] = baseline ms / rec ms`` for the baselines among ``records``
    (same ``n``, same mode; the dense ones on the dense pattern, flex and factorized on rec's)."""
    if "ms" not in rec:
        return
    dense_spec = P.dense().describe()
    speedups = {}
    for b in BASELINES:
        spec = dense_spec if b in DENSE_BACKENDS else rec["pattern_spec"]
        for base in records:
            if (
                base is not rec
                and "ms" in base
                and base["backend"] == b
                and base["pattern_spec"] == spec
                and base["mode"] == rec["mode"]
            ):
                speedups[b] = base["ms"] / rec["ms"]
    rec["speedup_vs"] = speedups


def bench_attention(
    backends: Sequence[str] | None = None,
    patterns: Sequence[str | P.Pattern] = ("strided", "fixed"),
    ns: Iterable[int] | None = None,
    batch_tokens: int | None = None,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    modes: Sequence[str] = MODES,
    out_jsonl: str | None = None,
    max_n: dict[str, int] | None = None,
    case_timeout_s: float | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Time attention backends on patterns and lengths; returns one record per case.

    Args:
        backends: names from :data:`ALL_BACKENDS` (the library's backends plus the dense baselines
            ``sdpa_cudnn``, ``sdpa_flash``); default: ``DEFAULTS[device type]``.
        patterns: specs for :func:`pattern_for` (``"strided"``, ``"fixed:128:32"``, ...) or pattern
            objects; the dense baselines ignore them.
        ns: sequence lengths; batch ``B = max(1, batch_tokens // n)``.
        heads, head_dim: inputs are ``[B, heads, n, head_dim]``.
        dtype: ``bf16`` | ``fp16`` | ``fp32``; default bf16 on CUDA, fp32 on CPU.
        modes: ``fwd`` and/or ``fwdbwd``.
        out_jsonl: append one JSON line per case to this file, as each case finishes.
        max_n: ``{backend: n}``: skip the backend at longer lengths (too slow or too large).
        case_timeout_s: CPU only (each case runs in its own process): give up on a case after this.
        verbose: print each JSON line to stdout and progress to stderr.

    Returns: the records (dicts; see the module docstring for the fields).
    """
    device = resolve_device(device, option="--device")
    sizes = [("--n", n) for n in ns or ()] + [("--batch-tokens", batch_tokens), ("--heads", heads)]
    for option, value in [*sizes, ("--head-dim", head_dim)]:
        if value is not None and value < 1:
            raise UserError(f"bench attention: {option} {value} must be at least 1")
    if case_timeout_s is not None and not case_timeout_s > 0:
        raise UserError(f"bench attention: --case-timeout {case_timeout_s} must be a positive number of seconds")
    if out_jsonl:
        check_output_file(out_jsonl, "bench attention: --out")
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    backends = tuple(backends or defaults["backends"])
    ns = tuple(ns or defaults["ns"])
    batch_tokens = batch_tokens if batch_tokens is not None else defaults["batch_tokens"]
    dtype = dtype_name(dtype or "auto", device)  # auto: bf16 on CUDA, fp32 on CPU
    max_n = dict(max_n or {})
    for b in backends:
        if b not in ALL_BACKENDS:
            raise UserError(f"unknown backend {b!r}; choose from {', '.join(ALL_BACKENDS)}")
    for m in modes:
        if m not in MODES:
            raise UserError(f"unknown mode {m!r}; choose fwd and/or fwdbwd")

    records: list[dict] = []
    for n in ns:
        batch = max(1, batch_tokens // n)
        # baselines first, so every record can be compared (and written) as soon as it is measured
        order = sorted(backends, key=lambda b: (b not in DENSE_BACKENDS, b not in BASELINES))
        runs = [(b, P.dense()) for b in order if b in DENSE_BACKENDS]
        runs += [(b, pattern_for(s, n)) for b in order if b not in DENSE_BACKENDS for s in patterns]
        recs_n = []
        for backend, pattern in runs:
            skip = _skip_reason(backend, n, device, max_n)
            for mode in modes:
                case = Case(backend, pattern, n, batch, heads, head_dim, dtype, str(device), mode)
                if skip:
                    fields = {"error": skip}
                elif device.type == "cuda":
                    fields = _run_case(case)
                else:
                    fields = _run_isolated(case, case_timeout_s)
                if "ms" in fields:
                    flops = 4 * head_dim * useful_pairs(pattern, n, heads, batch) * (3.5 if mode == "fwdbwd" else 1.0)
                    fields["useful_tflops"] = flops / (fields["ms"] * 1e-3) / 1e12
                rec = case.record(**fields)
                recs_n.append(rec)
                _add_speedups(recs_n, rec)
                if out_jsonl:  # one line per case at once: a run cut short keeps what it measured
                    with open(out_jsonl, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if verbose:
                    print(json.dumps(rec), flush=True)
        records += recs_n
    return records


def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def format_table(records: Sequence[dict]) -> str:
    """A markdown table of the records, with one speed-up column per baseline present."""
    present = [b for b in BASELINES if any(b in r.get("speedup_vs", {}) for r in records)]
    head = ["n", "B", "pattern", "backend", "mode", "ms", "useful TFLOP/s", "peak MiB"]
    head += [_BASELINE_TITLES[b] for b in present] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ok = "ms" in r
        cells = [
            f"{r['n']:,}",
            str(r["batch"]),
            r["pattern"],
            r["backend"],
            r["mode"],
            f"{r['ms']:.3f}" if ok else "",
            _num(r["useful_tflops"]) if ok else "",
            f"{r['peak_mib']:.0f}" if ok else "",
        ]
        cells += [_num(r["speedup_vs"][b]) + "x" if ok and b in r.get("speedup_vs", {}) else "" for b in present]
        cells.append(r.get("error", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_int(text: str) -> int:
    """``65536``, ``65_536``, ``64K`` or ``1M`` (powers of two) -> int."""
    t = text.strip().replace("_", "").upper()
    mult = {"K": 2**10, "M": 2**20}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``sparse-transformer bench attention``."""
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated from {', '.join(ALL_BACKENDS)} (default CUDA: "
        f"{','.join(DEFAULTS['cuda']['backends'])}; CPU: {','.join(DEFAULTS['cpu']['backends'])})",
    )
    p.add_argument(
        "--patterns",
        default="strided,fixed",
        help="comma-separated: strided[:l], fixed[:l[:c]], local[:w], dense; without l: strided "
        "l = sqrt(n) as a power of two, fixed l = 128 (n <= 16K) or 256, c = 32",
    )
    p.add_argument(
        "--n", default=None, help="comma-separated lengths, e.g. 4K,16K,64K (default CUDA: 4K..1M; CPU: 1K,4K)"
    )
    p.add_argument(
        "--batch-tokens", type=parse_int, default=None, help="B = batch_tokens // n (default CUDA 131072, CPU 4096)"
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=literal_values(Precision), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated: fwd, fwdbwd")
    p.add_argument(
        "--max-n",
        default="",
        help="comma-separated BACKEND=N: skip BACKEND above length N, e.g. sdpa_flash=64K,factorized=256K",
    )
    p.add_argument("--case-timeout", type=float, default=None, help="CPU: seconds before a case is abandoned")
    p.add_argument("--out", default=None, help="append JSON lines to this file")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparse-transformer bench attention``: JSON lines, then the table."""
    try:
        ns = [parse_int(s) for s in comma_list(args.n)] or None
        max_n = {}
        for item in comma_list(args.max_n):
            backend, _, value = item.partition("=")
            max_n[backend.strip()] = parse_int(value)
    except ValueError:
        raise UserError("--n and --max-n take integers such as 65536, 64K or 1M (--max-n as BACKEND=N)") from None
    records = bench_attention(
        backends=comma_list(args.backends) or None,
        patterns=comma_list(args.patterns),
        ns=ns,
        batch_tokens=args.batch_tokens,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        device=args.device,
        modes=comma_list(args.modes),
        out_jsonl=args.out,
        max_n=max_n,
        case_timeout_s=args.case_timeout,
    )
    print()
    print(format_table(records))
    return 0
