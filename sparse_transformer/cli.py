"""The ``sparse-transformer`` command: argument parsing, then one function per subcommand.

Bad input ends with one line on stderr naming the problem and the fix, and exit status 2. Building
the parser imports neither torch nor the benchmarks (each subcommand imports what it runs), so
``--help`` answers at once; ``bench WHAT`` builds its options when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ModelConfig, choices
from .errors import UserError


def cmd_prepare(args) -> int:
    from .data.prepare import prepare

    meta = prepare(args.kind, args.src, args.out, rate=args.rate)
    sizes = ", ".join(f"{k} {v:,}" for k, v in meta["splits"].items())
    print(f"wrote {args.out}: {sizes} bytes ({meta['modality']})")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from .config import load_config
    from .train import train

    if args.resume:
        if args.config:
            raise UserError(
                "train: --resume continues a run with its saved config; drop --config (overrides are allowed)"
            )
        train(None, run_dir=args.resume, resume=args.resume, overrides=overrides)
    else:
        train(load_config(args.config, overrides), run_dir=args.run_dir)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(
        args.run,
        split=args.split,
        max_tokens=args.max_tokens,
        device=args.device,
        data_dir=args.data,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result))
    else:
        counted = "dims" if result["unit"] == "bits per dim" else "bytes"
        print(f"{result['split']}: {result['bits_per_dim']:.4f} {result['unit']} over {result['tokens']:,} {counted}")
    return 0


def cmd_sample(args, overrides: list[str]) -> int:
    from .sample import sample_command

    paths = sample_command(
        args.run,
        num=args.num,
        temperature=args.temperature,
        top_k=args.top_k,
        prefix_file=args.prefix,
        out_dir=args.out,
        length=args.length,
        seed=args.seed,
        device=args.device,
        graphs=False if args.no_graphs else None,
        compile=args.compile,
        overrides=overrides,
    )
    for p in paths:
        print(p)
    return 0


def cmd_layout(args) -> int:
    from . import patterns

    try:
        pattern = patterns.from_name(args.pattern, args.stride, args.c, args.num_verts, args.part, args.integration)
    except ValueError as e:
        raise UserError(f"layout: {e}") from None
    pattern = pattern.for_layer(args.layer)
    if args.n < 1:
        raise UserError(f"layout: --n {args.n} must be positive")
    if args.n <= 64:
        print(pattern.ascii(args.n, head=args.head))
    pairs = pattern.num_pairs(args.n, head=args.head)
    causal = args.n * (args.n + 1) // 2
    print(
        f"{pattern.describe()} head {args.head}, n = {args.n:,}: {pairs:,} allowed pairs "
        f"({100 * pairs / causal:.3f} % of causal), at most {pattern.max_keys(args.n, head=args.head):,} keys per query"
    )
    if args.png:
        img = pattern.picture(args.n, head=args.head, block=args.block)
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        img.save(args.png)
        print(f"wrote {args.png} ({img.width}x{img.height})")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_runs

    baselines = {}
    for item in args.baseline:
        label, sep, value = item.rpartition("=")
        try:
            baselines[label] = float(value)
        except ValueError:
            raise UserError(f"plot: --baseline {item!r} must look like LABEL=BITS, e.g. 'xz -9e=2.09'") from None
        if not sep or not label:
            raise UserError(f"plot: --baseline {item!r} must look like LABEL=BITS, e.g. 'xz -9e=2.09'")
    print(plot_runs(args.runs, args.out, title=args.title, baselines=baselines, unit=args.unit))
    return 0


# The kinds of sparse_transformer.data.prepare.KINDS, repeated here so that building the parser does not
# import the data package (numpy); a test keeps the two equal.
PREPARE_KINDS = ("enwik8", "text", "cifar10", "imagenet64", "mnist", "fashion-mnist", "audio")

BENCHES = {
    "attention": "backends x patterns x n, fwd and fwd+bwd",
    "train": "training-step tokens/s, sparse vs dense",
    "sample": "sampling speed: cached vs uncached (CPU), decoding modes (CUDA)",
    "tiles": "tile sweep of the Triton kernels per launch role (CUDA)",
}


def cmd_bench(args) -> int:
    import importlib

    module = importlib.import_module(f".bench.{args.what}", __package__)
    p = argparse.ArgumentParser(prog=f"sparse-transformer bench {args.what}", description=BENCHES[args.what])
    module.add_arguments(p)
    return module.run(p.parse_args(args.rest)) or 0


def config_keys_help() -> str:
    """The ``train --help`` epilog: every config section and key with its type and default."""
    import dataclasses
    import json
    import typing

    from .config import Config, preset_names

    lines = ["config keys (override any with --section.key VALUE, e.g. --train.max_steps 100; defaults shown):"]
    for section in dataclasses.fields(Config):
        obj = section.default_factory()
        hints = typing.get_type_hints(type(obj))
        lines.append(f"  [{section.name}]")
        for f in dataclasses.fields(obj):
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"    --{section.name}.{f.name} {typ.upper()}  (default {json.dumps(getattr(obj, f.name))})")
    lines.append(f"presets (--config NAME): {', '.join(preset_names())}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .config import preset_names

    p = argparse.ArgumentParser(
        prog="sparse-transformer",
        description="Sparse Transformer: patterns, training, "
        "bits per byte (text, audio) or per dim (images), sampling, benchmarks",
    )
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="raw data -> train.bin/val.bin/test.bin + meta.json")
    sp.add_argument("kind", choices=PREPARE_KINDS)
    sp.add_argument("--src", default=None, help="file or folder (enwik8 and cifar10 download when omitted)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--rate", type=int, default=12000, help="audio sample rate in Hz")

    sp = sub.add_parser(
        "train",
        help="train a model (no arguments: the embedded default data)",
        epilog=config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("--config", default=None, help=f"a preset name ({', '.join(preset_names())}) or a TOML file")
    sp.add_argument("--run-dir", default=None, help="where to write the run (default runs/<time>)")
    sp.add_argument("--resume", default=None, metavar="DIR", help="continue this run to its configured end")

    sp = sub.add_parser("eval", help="bits per byte (text, audio) or per dim (images) of a trained run")
    sp.add_argument("--run", required=True, help="a run directory or an export (config.json + model.safetensors)")
    sp.add_argument("--split", default="test", choices=("train", "val", "test"))
    sp.add_argument("--max-tokens", type=int, default=None, help="score only the split's first N bytes")
    sp.add_argument("--data", default=None, metavar="DIR", help="prepared data to use instead of the run's data.dir")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    sp = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        epilog="Unset options take the run's [sample] config; --sample.KEY VALUE overrides it, e.g. --sample.top_k 40",
    )
    sp.add_argument("--run", required=True)
    sp.add_argument("--num", type=int, default=None, help="samples, drawn together in one batch (run's sample.num)")
    sp.add_argument("--length", type=int, default=None, help="tokens per sample (0 = the model's context)")
    sp.add_argument("--temperature", type=float, default=None, help="(run's sample.temperature)")
    sp.add_argument("--top-k", type=int, default=None, help="(run's sample.top_k; 0 = no truncation)")
    sp.add_argument("--prefix", default=None, help="a file whose bytes begin every sample (completions)")
    sp.add_argument("--out", default=None, help="output folder (default RUN/samples)")
    sp.add_argument("--seed", type=int, default=None, help="(run's sample.seed)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-graphs", action="store_true", help="CUDA: run the decoding step eagerly, not as a CUDA graph")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decoding step (long samples on CUDA)")

    sp = sub.add_parser("layout", help="print and draw an attention pattern")
    sp.add_argument("--pattern", required=True, choices=choices(ModelConfig, "pattern"))
    sp.add_argument("--n", type=int, required=True)
    sp.add_argument("--stride", type=int, default=None, help="l (for local: the window)")
    sp.add_argument("--c", type=int, default=None)
    sp.add_argument("--num-verts", type=int, default=1)
    sp.add_argument("--part", default="both", choices=choices(ModelConfig, "part"))
    sp.add_argument("--integration", default="merged", choices=choices(ModelConfig, "integration"))
    sp.add_argument("--layer", type=int, default=0, help="layer index (interleaved)")
    sp.add_argument("--head", type=int, default=0)
    sp.add_argument("--block", type=int, default=None, help="draw the block layout at this block size")
    sp.add_argument("--png", default=None)

    sp = sub.add_parser("plot", help="validation bits per byte or per dim of runs against training time and step (PNG)")
    sp.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    sp.add_argument("--out", required=True, help="the PNG to write")
    sp.add_argument("--title", default=None)
    sp.add_argument("--unit", default=None, help="y-axis unit (default: the runs' own, bits per byte or bits per dim)")
    sp.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="LABEL=BITS",
        help="a horizontal reference line, e.g. 'xz -9e=2.09' (repeatable)",
    )

    sp = sub.add_parser(
        "bench",
        help="benchmarks: attention kernels, training steps, sampling",
        epilog="Options of each: sparse-transformer bench WHAT --help. "
        + "; ".join(f"{k}: {v}" for k, v in BENCHES.items()),
    )
    sp.add_argument("what", choices=tuple(BENCHES))
    sp.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "sample":
            return cmd_sample(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {
            "prepare": cmd_prepare,
            "eval": cmd_eval,
            "layout": cmd_layout,
            "plot": cmd_plot,
            "bench": cmd_bench,
        }[args.command](args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even when a library's message is not
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
