"""``sparse-transformer bench sample``: sampling speed with the sparse KV cache vs without.

For ``strided`` and ``fixed`` (l = sqrt(length) by default), a small random model samples ``length``
tokens twice with the same seed: once with the KV cache (:meth:`SparseTransformer.decode_step`,
O(sqrt(n)) per token) and once without it (a full forward pass over the whole prefix at every step,
the ``factorized`` backend, O(n·sqrt(n)) per token). Both runs are measured in full over all
``length`` steps unless ``--no-cache-steps K`` is given, in which case the uncached run is timed over
the K steps that end at ``length`` (the most expensive ones) and *extrapolated* by
the cost model ``t(i) ∝ i`` (a forward pass over i positions; its true cost grows at least that
fast, so the extrapolated speed-up is a lower bound): this is flagged in the output
(``no_cache_measured_steps``) and the table. The full measurement at 4,096 tokens takes about
4 minutes on 2 CPU cores (fixed's uncached forward is the slow one); ``--no-cache-steps 256``
about 30 s. Prints one JSON line per pattern and a markdown table with tokens/s,
the speed-up, and the KV cache's bytes next to a dense KV cache's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..config import Config, DataConfig, ModelConfig
from ..model import SparseTransformer
from ..sample import generate


def _model(
    pattern: str, length: int, n_layer: int, d_model: int, n_head: int, stride: int, c: int, device
) -> tuple[SparseTransformer, Config]:
    cfg = Config(
        model=ModelConfig(
            n_layer=n_layer,
            d_model=d_model,
            n_head=n_head,
            n_ctx=length,
            pattern=pattern,
            stride=stride,
            c=c,
            backend="factorized",
        ),
        data=DataConfig(seq_len=length),
    )
    torch.manual_seed(0)
    model = SparseTransformer(cfg.model)
    with torch.no_grad():  # W_out starts at zero (uniform logits); random weights make samples vary
        model.head.weight.normal_(0.0, d_model**-0.5)
    return model.to(device).eval(), cfg


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
    """
    if threads:
        torch.set_num_threads(threads)
    stride = stride or max(1, round(length**0.5))
    rows = []
    for pattern in patterns:
        model, cfg = _model(pattern, length, n_layer, d_model, n_head, stride, c, device)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--length", type=int, default=4096, help="tokens to sample")
    p.add_argument("--patterns", default="strided,fixed", help="comma-separated: strided, fixed, local, dense")
    p.add_argument("--num", type=int, default=1, help="samples drawn together (batch)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--stride", type=int, default=0, help="l (0 = sqrt(length))")
    p.add_argument("--c", type=int, default=8, help="fixed: summary cells per block")
    p.add_argument(
        "--no-cache-steps",
        type=int,
        default=0,
        help="time only the last K uncached steps and extrapolate (0 = measure all)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both runs (0 = PyTorch's default)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    bench_sample(
        length=args.length,
        patterns=tuple(s.strip() for s in args.patterns.split(",") if s.strip()),
        num=args.num,
        n_layer=args.n_layer,
        d_model=args.d_model,
        n_head=args.n_head,
        stride=args.stride,
        c=args.c,
        no_cache_steps=args.no_cache_steps,
        threads=args.threads,
        device=args.device,
    )
    return 0
