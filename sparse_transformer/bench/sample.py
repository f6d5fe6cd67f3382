"""``sparse-transformer bench sample``: sampling speed with the sparse KV cache.

On CPU (``--device cpu``, the default), the cache against no cache. For ``strided`` and ``fixed`` (l = sqrt(length) by default), a small random model samples ``length``
tokens twice with the same seed: once with the KV cache (:meth:`SparseTransformer.decode_step`,
O(sqrt(n)) per token) and once without it (a full forward pass over the whole prefix at every step,
the ``factorized`` backend, O(n·sqrt(n)) per token). Both runs are measured in full over all
``length`` steps unless ``--no-cache-steps K`` is given, in which case the uncached run is timed over
the K steps that end at ``length`` (the most expensive ones) and *extrapolated* by
the cost model ``t(i) ∝ i + 1`` (step i is a forward pass over i + 1 positions): this is flagged
in the output (``no_cache_measured_steps``) and the table, and ``same_tokens`` (whether the cached
and uncached runs drew the same bytes) is then null. The extrapolation is an estimate, not a bound:
a step's cost also has a part that does not grow with i (per-step overhead, which makes the early
steps dearer than the model says) and one that grows faster (attention); at 1,024 tokens on 2 CPU
cores the first won: 8.8x (strided) and 9.3x (fixed) extrapolated from 64 steps against 10.5x and
9.9x measured in full. The full measurement at 4,096 tokens takes about
4 minutes on 2 CPU cores (fixed's uncached forward is the slow one); ``--no-cache-steps 256``
about 30 s. Prints one JSON line per pattern and a markdown table with tokens/s,
the speed-up, and the KV cache's bytes next to a dense KV cache's.

On CUDA (``--device cuda``), a preset model (default the 152M-parameter ``audio`` model, strided
l = 256 at 65,536 tokens, paper §7.4) with random weights in bf16, per batch size and per mode of
the decoding step: ``eager`` (the fixed-shape step run op by op), ``graphs`` (captured once in a CUDA
graph and replayed) and ``compile`` (compiled by ``torch.compile``, then captured). A step's work does not
depend on the position (every shape is fixed), so the step is timed over a window of ``--window``
positions at the end of the sample, after a warm-up, and the time of the whole sample is
*extrapolated* from it (``extrapolated: true`` in the JSON, "(extrapolated)" in the table). A batch
whose cache does not fit in free GPU memory is run at the longest halved length that fits, flagged
in ``length``/``note``. Reported: ms per step, tokens/s (batch x steps / s), the sample's time, the
set-up time (capture, compilation), the KV cache's bytes and a dense cache's, the weights' bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from ..cli import at_least, device_arg
from ..config import Config, DataConfig, ModelConfig, SampleConfig, load_config, validate
from ..errors import UserError
from ..model import SparseTransformer
from ..options import comma_list, keywords
from ..runtime import DTYPES
from ..sample import NOISE_STEPS, Decoder, generate


def _random_model(cfg: Config, device, dtype) -> SparseTransformer:
    torch.manual_seed(0)
    model = SparseTransformer(cfg.model)
    with torch.no_grad():  # W_out starts at zero (uniform logits); random weights make samples vary
        model.head.weight.normal_(0.0, cfg.model.d_model**-0.5)
    return model.to(device=device, dtype=dtype).eval()


def _model(length: int, device, **model) -> tuple[SparseTransformer, Config]:
    """A random fp32 model of ``length`` positions on the ``factorized`` backend; ``model``: the
    other fields of its ModelConfig (pattern, sizes)."""
    cfg = Config(model=ModelConfig(n_ctx=length, backend="factorized", **model), data=DataConfig(seq_len=length))
    return _random_model(cfg, device, torch.float32), cfg


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _time_no_cache(model, cfg, num, length, steps, device) -> tuple[float, torch.Tensor | None]:
    """Seconds for all ``length`` uncached steps and the tokens drawn: measured (``steps = 0``), or
    extrapolated from the last ``steps`` steps by ``t(i) ∝ i + 1`` (no tokens then)."""
    if not steps or steps >= length:
        _sync(device)
        t0 = time.perf_counter()
        tokens = generate(model, cfg, num, length, use_cache=False, seed=0, device=device)
        _sync(device)
        return time.perf_counter() - t0, tokens
    x = torch.randint(0, 256, (num, length), device=device)
    first = length - steps
    _sync(device)
    t0 = time.perf_counter()
    for i in range(first, length):
        model(x[:, : i + 1])
    _sync(device)
    measured = time.perf_counter() - t0
    work = lambda a, b: (b * (b + 1) - a * (a + 1)) // 2  # sum of (i + 1) over i in [a, b)
    return measured * work(0, length) / work(first, length), None


def bench_sample(
    length: int = 4096,
    patterns: tuple[str, ...] = ("strided", "fixed"),
    num: int = 1,
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 2,
    stride: int = 0,
    c: int = 8,
    no_cache_steps: int = 0,
    threads: int = 1,
    device: str = "cpu",
) -> list[dict]:
    """Time sampling ``length`` tokens with and without the KV cache, per pattern.

    Args:
        stride: l; 0 = round(sqrt(length)).
        no_cache_steps: 0 measures the uncached run in full; K > 0 times its last K steps and
            extrapolates (see the module docstring).
        threads: CPU threads for both runs (0 = PyTorch's default). One decoded token is a few
            dozen tiny ops, which more threads only slow down (and badly on a busy machine).
    Returns: one dict per pattern (also printed as JSON lines, then a markdown table).
    Raises: UserError for sizes a model cannot have (checked as a config is).
    """
    stride = stride or max(1, round(length**0.5))  # before the checks: c <= stride is one of them
    for pattern in patterns:  # the one schema's checks, before anything is timed
        sizes = ModelConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, stride=stride, c=c, pattern=pattern)
        validate(Config(model=sizes, data=DataConfig(seq_len=length), sample=SampleConfig(num=num)))
    if threads:
        torch.set_num_threads(threads)
    sizes = {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "stride": stride, "c": c}
    rows = []
    for pattern in patterns:
        model, cfg = _model(length, device, pattern=pattern, **sizes)
        generate(model, cfg, num, min(length, 64), seed=0, device=device)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        cached = generate(model, cfg, num, length, seed=0, device=device)
        _sync(device)
        t_cache = time.perf_counter() - t0
        t_full, full = _time_no_cache(model, cfg, num, length, no_cache_steps, device)
        kv = model.new_cache(num, length, device="meta")
        row = {
            "bench": "sample",
            "pattern": model.blocks[0].attn.pattern.describe(),
            "length": length,
            "num": num,
            "n_layer": n_layer,
            "d_model": d_model,
            "n_head": n_head,
            "params": model.num_params(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cache_tokens_per_s": round(num * length / t_cache, 1),
            "no_cache_tokens_per_s": round(num * length / t_full, 1),
            "speedup": round(t_full / t_cache, 1),
            "cache_s": round(t_cache, 2),
            "no_cache_s": round(t_full, 2),
            "no_cache_measured_steps": no_cache_steps if 0 < no_cache_steps < length else length,
            "cache_bytes": kv.nbytes,
            "dense_cache_bytes": kv.dense_nbytes,
            "cache_vs_dense": round(kv.nbytes / kv.dense_nbytes, 3),
            # same seed and the same logits up to rounding: both paths should draw the same tokens
            "same_tokens": None if full is None else bool(torch.equal(cached, full)),
            "torch": torch.__version__,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print("| pattern | length | cached tok/s | uncached tok/s | speed-up | KV cache bytes | dense KV bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        est = "" if r["no_cache_measured_steps"] == r["length"] else " (extrapolated)"
        print(
            f"| {r['pattern']} | {r['length']:,} | {r['cache_tokens_per_s']:,.0f} | {r['no_cache_tokens_per_s']:,.1f}{est} "
            f"| {r['speedup']:.1f}x | {r['cache_bytes']:,} | {r['dense_cache_bytes']:,} |"
        )
    return rows


HBM_BYTES_PER_S = 4.8e12  # an H200's memory bandwidth, for the weight-reading bound in the table


def _fitting_length(model, batch: int, length: int, device) -> int:
    """The longest of ``length``, ``length/2``, ... whose cache takes at most 80 % of free memory."""
    free = torch.cuda.mem_get_info(device)[0]
    while length > 1024 and model.new_cache(batch, length, device="meta").nbytes > 0.8 * free:
        length //= 2
    return length


@torch.inference_mode()
def _time_mode(
    model,
    batch: int,
    length: int,
    mode: str,
    window: int,
    warmup: int,
    device,
    fused: bool | None = None,
    profile: int = 0,
    fused_linear: bool = False,
) -> dict:
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
    noise = torch.empty(min(NOISE_STEPS, length), batch, model.head.out_features, device=device)
    noise.exponential_(1.0, generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    t0 = time.perf_counter()
    decoder = Decoder(
        model,
        tokens,
        1.0,
        0,
        noise,
        graphs=mode != "eager",
        compile=mode == "compile",
        fused=fused,
        fused_linear=fused_linear,
    )
    _sync(device)
    setup = time.perf_counter() - t0
    window = min(window, length - 1)
    warmup = min(warmup, length - window)
    decoder.pos.fill_(length - window - warmup)  # the shapes do not depend on the position
    for _ in range(warmup):
        decoder.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(window):
        decoder.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    row = {
        "captured": decoder.graph is not None,
        "fused_attention": all(layer.fused for layer in decoder.cache.layers),
        "fused_linear": decoder.cache.fused_linear,
        "compiled": decoder.compiled,
        "timed_steps": window,
        "ms_per_step": round(1e3 * seconds / window, 4),
        "tokens_per_s": round(batch * window / seconds, 1),
        "sample_s": round(length * seconds / window, 1),
        "extrapolated": window < length,
        "setup_s": round(setup, 1),
        "cache_bytes": decoder.cache.nbytes,
        "dense_cache_bytes": decoder.cache.dense_nbytes,
        "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20),
    }
    if profile:
        steps = min(profile, window + warmup)
        decoder.pos.fill_(length - steps)  # positions inside the sample
        row["profile"] = _profile_steps(decoder, steps)
    del decoder, tokens, noise
    if mode == "compile":
        torch._dynamo.reset()  # drop the compiled step (and the buffers its guards refer to)
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _profile_steps(decoder: Decoder, steps: int, top: int = 8) -> dict:
    """The GPU kernels of ``steps`` decoding steps (torch.profiler / CUPTI, kernels replayed from a
    CUDA graph included): kernels per step, their summed time per step (the GPU's busy time; the
    rest of a step is launch and dependency latency) and the ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return {
        "steps": steps,
        "kernels_per_step": round(len(kernels) / steps, 1),
        "kernel_us_per_step": round(sum(e.device_time for e in kernels) / steps, 1),
        "top": [
            {"kernel": name[:90], "per_step": round(len(t) / steps, 1), "us_per_step": round(sum(t) / steps, 1)}
            for name, t in ranked[:top]
        ],
    }


def bench_sample_cuda(
    preset: str = "audio",
    length: int = 0,
    batches: tuple[int, ...] = (1, 8, 64),
    modes: tuple[str, ...] = ("eager", "graphs", "compile"),
    window: int = 2048,
    warmup: int = 16,
    dtype: str = "bf16",
    device: str = "cuda",
    out_jsonl: str | None = None,
    attention: str = "fused",
    profile: int = 0,
    linear: str = "fused",
) -> list[dict]:
    """Time the decoding step of a preset model on CUDA (see the module docstring).

    Args:
        preset: a name in ``configs/`` or a TOML path (its model; weights random).
        length: tokens per sample (0 = the preset's context, 65,536 for ``audio``).
        batches: samples decoded together; modes: ``eager``, ``graphs``, ``compile``.
        window, warmup: timed and untimed steps per mode (the rest is extrapolated).
        dtype: ``bf16``, ``fp16`` or ``fp32`` weights.
        out_jsonl: also append the JSON lines to this file.
        attention: ``torch`` (the step's attention as torch operations: scatter, gather, products,
            softmax) or ``fused`` (one Triton launch per layer, the default on CUDA), or both,
            comma-separated (each mode is then timed with each).
        linear: ``torch`` (the blocks' projections, norms, GeLU and residual adds as torch
            operations, fused by ``torch.compile`` in the compile mode) or ``fused`` (one Triton launch
            per projection with its norm, GeLU and residual), or both, comma-separated.
        profile: after timing, profile this many steps (0 = none): kernels per step, their summed
            GPU time per step and the costliest kernels, in each row's ``profile``.
    Returns: one dict per (batch, mode, attention, linear), also printed as JSON lines, then a
        markdown table.
    Raises: ValueError for an unknown mode, dtype, attention or linear, or a length above the
        preset's context.
    """
    if dtype not in DTYPES or not set(modes) <= {"eager", "graphs", "compile"}:
        raise ValueError(f"dtype {dtype!r} / modes {modes}: choose bf16|fp16|fp32 and eager,graphs,compile")
    kinds = comma_list(attention)
    if not kinds or not set(kinds) <= {"fused", "torch"}:
        raise ValueError(f"attention {attention!r}: choose fused, torch or fused,torch")
    linears = comma_list(linear)
    if not linears or not set(linears) <= {"fused", "torch"}:
        raise ValueError(f"linear {linear!r}: choose torch, fused or torch,fused")
    cfg = load_config(preset)
    length = length or cfg.model.n_ctx
    if length > cfg.model.n_ctx:
        raise ValueError(f"length {length} exceeds the preset's context {cfg.model.n_ctx}")
    device = torch.device(device)
    model = _random_model(cfg, device, DTYPES[dtype])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for batch in batches:
        n = _fitting_length(model, batch, length, device)
        for mode, kind, lin in [(m, k, li) for m in modes for k in kinds for li in linears]:
            fused = [f"fused {part}" for part, on in (("attention", kind == "fused"), ("linear", lin == "fused")) if on]
            row = {
                "bench": "sample",
                "preset": preset,
                "pattern": model.blocks[0].attn.pattern.describe(),
                "mode": f"{mode} ({', '.join(fused)})" if fused else mode,
                "attention": kind,
                "linear": lin,
                "batch": batch,
                "length": n,
                "dtype": dtype,
                "params": model.num_params(),
                "weight_bytes": weight_bytes,
                "device": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
            }
            if n < length:
                row["note"] = f"a {length:,}-token cache does not fit in free memory; run at {n:,}"
            torch.cuda.reset_peak_memory_stats(device)
            try:
                row.update(
                    _time_mode(model, batch, n, mode, window, warmup, device, kind == "fused", profile, lin == "fused")
                )
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"[:300]
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            if out_jsonl:
                with open(out_jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    print()
    print(format_cuda_table(rows))
    return rows


def format_cuda_table(rows: list[dict]) -> str:
    """The markdown table of :func:`bench_sample_cuda`'s rows."""
    lines = [
        "| mode | batch | length | ms/step | tokens/s | one sample of the length | set-up | KV cache | dense KV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['length']:,} | {r['error']} | | | | | |")
            continue
        est = " (extrapolated)" if r["extrapolated"] else ""
        mode = r["mode"] + ("" if r["captured"] or r["mode"].startswith("eager") else " (capture failed)")
        lines.append(
            f"| {mode} | {r['batch']} | {r['length']:,} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {r['sample_s']:,.1f} s{est} | {r['setup_s']:.0f} s | {r['cache_bytes'] / 2**30:.2f} GiB "
            f"| {r['dense_cache_bytes'] / 2**30:.2f} GiB |"
        )
    if rows:
        r = rows[0]
        bound = r["weight_bytes"] / HBM_BYTES_PER_S
        lines.append(
            f"\nEvery step reads all {r['weight_bytes'] / 1e6:,.0f} MB of weights: at {HBM_BYTES_PER_S / 1e12:.1f} TB/s "
            f"(H200 HBM3e) that bounds batch-1 decoding at {1e3 * bound:.3f} ms/step, "
            f"{bound * max(x['length'] for x in rows):,.1f} s for {max(x['length'] for x in rows):,} tokens."
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--length",
        type=at_least(0),
        default=0,
        help="tokens to sample (0 = 4,096 on CPU, the preset's context on CUDA)",
    )
    p.add_argument("--patterns", default="strided,fixed", help="comma-separated: strided, fixed, local, dense")
    p.add_argument("--num", type=at_least(1), default=1, help="samples drawn together (batch; default 1)")
    p.add_argument("--n-layer", type=at_least(1), default=2, help="layers of the random model (default 2)")
    p.add_argument("--d-model", type=at_least(1), default=64, help="its width (default 64)")
    p.add_argument("--n-head", type=at_least(1), default=2, help="its heads (default 2)")
    p.add_argument("--stride", type=at_least(0), default=0, help="l (0 = sqrt(length))")
    p.add_argument("--c", type=at_least(1), default=8, help="fixed: summary cells per block (default 8)")
    p.add_argument(
        "--no-cache-steps",
        type=at_least(0),
        default=0,
        help="time only the last K uncached steps and extrapolate (0 = measure all)",
    )
    p.add_argument("--threads", type=at_least(0), default=1, help="CPU threads for both runs (0 = PyTorch's default)")
    p.add_argument(
        "--device", type=device_arg, default="cpu", help="cpu: cache vs no cache; cuda: the decoding modes of a preset"
    )
    cuda = p.add_argument_group("CUDA")
    cuda.add_argument("--preset", default=None, help="a name in configs/ or a TOML file (default audio)")
    cuda.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    cuda.add_argument("--modes", default="eager,graphs,compile", help="comma-separated: eager, graphs, compile")
    cuda.add_argument(
        "--window", type=at_least(1), default=2048, help="timed steps per mode (the rest is extrapolated)"
    )
    cuda.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    cuda.add_argument("--out", default=None, help="append the JSON lines to this file")
    cuda.add_argument(
        "--profile",
        type=at_least(0),
        default=0,
        help="after timing, profile this many steps: kernels per step, GPU time, the costliest kernels",
    )
    cuda.add_argument(
        "--attention", default="fused", help="fused (one Triton kernel per layer), torch, or fused,torch (both)"
    )
    cuda.add_argument(
        "--linear",
        default="fused",
        help="torch (projections, norms, GeLU, residuals as torch operations), fused (one Triton kernel "
        "per projection with its norm, GeLU and residual), or torch,fused (both)",
    )


def run(args: argparse.Namespace) -> int:
    if torch.device(args.device).type == "cuda":
        batches = tuple(int(b) for b in comma_list(args.batches))
        modes = tuple(comma_list(args.modes))
        preset = args.preset or "audio"
        bench_sample_cuda(
            **keywords(bench_sample_cuda, args, preset=preset, batches=batches, modes=modes, out_jsonl=args.out)
        )
        return 0
    if args.preset is not None:
        raise UserError(
            f"--preset {args.preset!r} applies to --device cuda; on CPU give the model with --patterns, "
            "--n-layer, --d-model, --n-head"
        )
    patterns = tuple(comma_list(args.patterns))
    bench_sample(**keywords(bench_sample, args, length=args.length or 4096, patterns=patterns))
    return 0
