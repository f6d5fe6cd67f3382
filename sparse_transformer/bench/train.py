"""``sparse-transformer bench train``: training-step throughput, sparse model vs dense, one process.

A training step here is the one ``sparse-transformer train`` runs (:func:`~sparse_transformer.train.train_step`
on what :func:`~sparse_transformer.train.setup_training` builds): forward and loss under bf16
autocast (CUDA; fp32 on CPU unless asked), backward through the grad scaler (fp16), gradient
clipping, fused AdamW (CUDA) with weight decay on matrices only, activation checkpointing of every
block (``model.checkpoint = True``; ``--set model.checkpoint=false`` keeps the activations instead),
each checkpointed block compiled, the checkpoint inside the compiled region, where the preset sets
``train.compile`` (CUDA only; the GPU presets do; the record's ``compiled``). Inputs are random bytes; the learning rate is ``train.lr``.
The same configuration is run twice in the same process: with its sparse pattern (backend
``auto`` = Triton on CUDA, or the one asked for) and with dense causal attention through
``F.scaled_dot_product_attention`` (``model.pattern = dense``, ``model.backend = sdpa``; on CUDA
pinned to the cuDNN kernel, flash where cuDNN declines, for the whole step so that recomputed
forwards use the same kernel).

Reported per model (one JSON line each, then a markdown table): ``tokens_per_s`` (batch · n · steps
over the wall time of ``steps`` steps after ``warmup`` steps, synchronized), ``step_ms``, ``peak_mib``
(``torch.cuda.max_memory_allocated`` over warm-up and timed steps: parameters, optimizer state and
activations; on CPU the process's peak resident set, ``ru_maxrss``), the parameter count and, for
the sparse model, ``speedup_vs_dense`` with the target it is held to.

Named cases (the targets of docs/benchmarks.md), :data:`CASES`:

* ``enwik8``:     the paper's Enwik8 model (30 layers, d 512, 8 heads, n 12,288, fixed l 128 c 32,
                  merged heads), batch 8. Target: >= 1.8x dense tokens/s (ideal 2.08x).
* ``strided64k``: the same model with strided l = 256 at n = 65,536, batch 1. Target: >= 8x.
* ``audio1m``:    a 3M-parameter audio model (16 layers, d 128, 4 heads, strided l = 1024, merged)
                  at n = 1,048,576, batch 1. Target: a full step fits on one 80 GB GPU. The dense
                  model is not run: dense attention at 1M takes ~10 s fwd+bwd per 8-head d-64 call
                  (docs/benchmarks.md), so a step of 16 layers with recomputation would take a minute
                  or more.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import parallel
from ..attention import resolve_backend
from ..cli import at_least
from ..config import Config, TrainConfig, apply_overrides, choices, load_config, validate
from ..errors import UserError
from ..model import SparseTransformer, model_pattern
from ..options import comma_list
from ..paths import check_output_file
from ..runtime import DTYPES, dtype_name, resolve_device
from ..train import setup_training, train_step
from .attention import pattern_label

__all__ = ["CASES", "add_arguments", "bench_train", "format_table", "run"]

CASES = {
    "enwik8": {"preset": "enwik8", "n": 12288, "batch": 8, "overrides": [], "target": 1.8},
    "strided64k": {
        "preset": "enwik8",
        "n": 65536,
        "batch": 1,
        "target": 8.0,
        "overrides": ["--model.pattern", "strided", "--model.stride", "256"],
    },
    "audio1m": {
        "preset": "audio",
        "n": 1048576,
        "batch": 1,
        "target": None,
        "overrides": [
            "--model.n_layer",
            "16",
            "--model.d_model",
            "128",
            "--model.n_head",
            "4",
            "--model.stride",
            "1024",
            "--model.integration",
            "merged",
        ],
        "dense": False,
        "dense_note": "dense not run: ~10 s per dense attention fwd+bwd at n = 1M (docs/benchmarks.md), "
        "a minute or more per step",
    },
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10


def _dense_kernels(device: torch.device):
    """Pin dense SDPA to cuDNN (flash where cuDNN declines a shape), the dense baseline of docs/benchmarks.md."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])


def _measure(cfg: Config, device: torch.device, dtype: torch.dtype, steps: int, warmup: int, dense: bool) -> dict:
    """Build the model as ``train`` does, run ``warmup`` then ``steps`` timed training steps."""
    torch.manual_seed(0)
    model = SparseTransformer(cfg.model).to(device)
    train_model, optimizer, scaler = setup_training(model, cfg, parallel.Dist(device=device), dtype)
    batch, n = cfg.train.batch_size, cfg.data.seq_len
    x = torch.randint(0, 256, (batch, n), device=device, dtype=torch.uint8)

    def step():
        train_step(train_model, optimizer, scaler, lambda: x, cfg.train, dtype, cfg.train.lr)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _dense_kernels(device) if dense else nullcontext():
        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        elapsed = time.perf_counter() - t0
    return {
        "params": model.num_params(),
        "tokens_per_s": batch * n * steps / elapsed,
        "step_ms": elapsed / steps * 1e3,
        "peak_mib": _peak_mib(device),
    }


def _error_line(e: BaseException) -> str:
    """One line for a failed model: the innermost cause's type and first line of text (a compiler
    error wraps the one that says what went wrong), or ``out of memory`` when any exception of the
    chain is one."""
    chain = [e]
    while (inner := chain[-1].__cause__ or getattr(chain[-1], "inner_exception", None)) is not None:
        if any(inner is seen for seen in chain):
            break
        chain.append(inner)
    first = lambda x: next((line.strip() for line in str(x).splitlines() if line.strip()), "")
    oom = next((x for x in chain if isinstance(x, torch.OutOfMemoryError) or "out of memory" in first(x).lower()), None)
    if oom is not None:
        return f"out of memory: {first(oom)}"[:300]
    return f"{type(chain[-1]).__name__}: {first(chain[-1])}"[:300]


def _run_model(cfg: Config, device, dtype, steps, warmup, dense) -> dict:
    """One model's record; afterwards dynamo forgets its compiled blocks, so the next model compiles
    afresh as its own ``train`` run would (the blocks of every model share their code: without the
    reset, dynamo's recompile limit would leave the later models of a long list eager, silently)."""
    try:
        fields = _measure(cfg, device, dtype, steps, warmup, dense)
    except Exception as e:  # noqa: BLE001 - a failing model (OOM, unsupported) is a result
        fields = {"error": _error_line(e)}
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fields


def _compare(records: list[dict], is_dense: list[bool], dense: bool, target, dense_note) -> None:
    """Add ``speedup_vs_dense`` (and the target verdict) to the sparse records."""
    dense_rec = next((r for r, d in zip(records, is_dense) if d), None)
    for r, d in zip(records, is_dense):
        if d:
            continue
        if dense_rec is not None and "tokens_per_s" in r and "tokens_per_s" in dense_rec:
            r["speedup_vs_dense"] = r["tokens_per_s"] / dense_rec["tokens_per_s"]
        elif not dense and dense_note:
            r["note"] = dense_note
        if target is not None:
            r["target_speedup"] = target
            if "speedup_vs_dense" in r:
                r["target_met"] = r["speedup_vs_dense"] >= target


def bench_train(
    preset_or_cfg: str | Path | Config,
    n: int | None = None,
    batch: int | None = None,
    steps: int = 5,
    sparse_backend: str | Sequence[str] = "auto",
    overrides: Sequence[str] = (),
    warmup: int = 2,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    dense: bool = True,
    case: str | None = None,
    target: float | None = None,
    dense_note: str | None = None,
    out_jsonl: str | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Tokens/s and peak memory of full training steps: the sparse model, then the same model dense.

    Args:
        preset_or_cfg: a preset name (``enwik8``), a TOML path, or a :class:`Config`.
        n, batch: sequence length (``data.seq_len``) and sequences per step (``train.batch_size``);
            default: the config's.
        steps, warmup: timed steps, and untimed steps before them (compilation, autotuning).
        sparse_backend: attention backend(s) of the sparse model (one record each).
        overrides: ``["--model.n_layer", "2", ...]`` applied after the preset.
        device: default CUDA when available. dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), bf16,
            fp16 or fp32 (autocast dtype; fp32 = no autocast).
        dense: also run the dense SDPA model (``dense_note`` says why when it is not).
        case, target: a label for the records, and the speed-up the sparse model is held to.
        out_jsonl: append one JSON line per model to this file.

    Returns: one record per model; sparse records carry ``speedup_vs_dense`` when dense ran.
    """
    device = resolve_device(device, option="--device")
    dtype = dtype_name(dtype, device)
    if out_jsonl:
        check_output_file(out_jsonl, "bench train: --out")
    # every block recomputed in the backward unless an override says otherwise (--set model.checkpoint=false)
    overrides = ["--model.checkpoint=true", *overrides]
    if isinstance(preset_or_cfg, Config):
        cfg = apply_overrides(copy.deepcopy(preset_or_cfg), overrides)
    else:
        cfg = load_config(str(preset_or_cfg), overrides)
    sizes = ([f"--data.seq_len={n}"] if n else []) + ([f"--train.batch_size={batch}"] if batch else [])
    cfg = validate(apply_overrides(cfg, sizes))
    backends = [sparse_backend] if isinstance(sparse_backend, str) else list(sparse_backend)

    runs = []
    for b in backends:
        c = validate(apply_overrides(copy.deepcopy(cfg), [f"--model.backend={b}"]))
        runs.append((c, False))
    if dense:
        runs.append(
            (validate(apply_overrides(copy.deepcopy(cfg), ["--model.pattern=dense", "--model.backend=sdpa"])), True)
        )

    records = []
    try:
        for c, is_dense in runs:
            pattern = model_pattern(c.model).for_layer(0)
            rec = {
                "case": case,
                "device": str(device),
                "dtype": dtype,
                "n": c.data.seq_len,
                "batch": c.train.batch_size,
                "steps": steps,
                "n_layer": c.model.n_layer,
                "d_model": c.model.d_model,
                "n_head": c.model.n_head,
                "pattern": "dense" if is_dense else pattern_label(model_pattern(c.model)),
                "backend": resolve_backend(c.model.backend, pattern, device)
                + (" (cuDNN)" if is_dense and device.type == "cuda" else ""),
                "checkpoint": c.model.checkpoint,
                "compiled": c.train.compile and device.type == "cuda",  # parallel.compile_blocks
            }
            if verbose:
                print(
                    f"[bench train] {case or ''} {rec['pattern']} {rec['backend']} n={rec['n']} batch={rec['batch']}",
                    file=sys.stderr,
                    flush=True,
                )
            rec.update(_run_model(c, device, DTYPES[dtype], steps, warmup, is_dense))
            records.append(rec)
    finally:  # an interrupted run (Ctrl-C, a shell timeout's SIGINT) still writes what it measured
        _compare(records, [d for _, d in runs], dense, target, dense_note)
        if out_jsonl:
            with open(out_jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        if verbose:
            for r in records:
                print(json.dumps(r), flush=True)
    return records


def format_table(records: Sequence[dict]) -> str:
    """A markdown table: one row per model."""
    head = [
        "case",
        "model",
        "n",
        "B",
        "pattern",
        "backend",
        "params",
        "tokens/s",
        "step ms",
        "peak GiB",
        "x dense",
        "target",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ok = "tokens_per_s" in r
        target = r.get("target_speedup")
        cells = [
            r.get("case") or "",
            f"{r['n_layer']}L d{r['d_model']} h{r['n_head']}",
            f"{r['n']:,}",
            str(r["batch"]),
            r["pattern"],
            r["backend"],
            f"{r['params'] / 1e6:.2f}M" if ok else "",
            f"{r['tokens_per_s']:,.0f}" if ok else "",
            f"{r['step_ms']:.1f}" if ok else "",
            f"{r['peak_mib'] / 1024:.2f}" if ok else "",
            f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "",
            ""
            if target is None
            else f">= {target}x " + ("met" if r.get("target_met") else "missed" if "target_met" in r else ""),
            r.get("error", r.get("note", "")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``sparse-transformer bench train``."""
    p.add_argument(
        "--case",
        default=None,
        help=f"comma-separated named cases: {', '.join(CASES)} (sets preset, n, batch, target); "
        "default: all of them, unless --config is given",
    )
    p.add_argument("--config", default=None, help="a preset name or TOML file (instead of --case)")
    p.add_argument("--n", type=at_least(1), default=None, help="sequence length (default: the case's or config's)")
    p.add_argument(
        "--batch", type=at_least(1), default=None, help="sequences per step (default: the case's or config's)"
    )
    p.add_argument("--steps", type=at_least(1), default=5, help="timed steps")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first")
    p.add_argument("--backend", default="auto", help="comma-separated attention backends of the sparse model")
    p.add_argument("--no-dense", action="store_true", help="skip the dense SDPA model")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config override, e.g. --set model.n_layer=2 (repeatable)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=choices(TrainConfig, "dtype"))
    p.add_argument("--out", default=None, help="append JSON lines to this file")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparse-transformer bench train``: JSON lines, then the table."""
    backends = comma_list(args.backend)
    for item in args.set:
        key, _, value = item.partition("=")
        if "." not in key or not value or key.startswith("-"):
            raise UserError(f"bench train: --set {item!r} must look like SECTION.KEY=VALUE, e.g. --set model.n_layer=2")
    overrides = [f"--{s}" for s in args.set]
    if args.config:
        jobs = [{"preset": args.config, "overrides": [], "target": None}]
    else:
        names = comma_list(args.case or ",".join(CASES))
        unknown = [c for c in names if c not in CASES]
        if unknown:
            raise UserError(f"bench train: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
        jobs = [dict(CASES[c], case=c) for c in names]
    records = []
    for job in jobs:
        records += bench_train(
            job["preset"],
            n=args.n or job.get("n"),
            batch=args.batch or job.get("batch"),
            steps=args.steps,
            sparse_backend=backends,
            overrides=list(job["overrides"]) + overrides,
            warmup=args.warmup,
            device=args.device,
            dtype=args.dtype,
            dense=job.get("dense", True) and not args.no_dense,
            case=job.get("case"),
            target=job.get("target"),
            dense_note=job.get("dense_note"),
            out_jsonl=args.out,
        )
    print()
    print(format_table(records))
    return 0
