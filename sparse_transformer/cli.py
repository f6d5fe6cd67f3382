"""The ``sparse-transformer`` command: argument parsing, then one function per subcommand.

Bad input ends with one line on stderr naming the problem and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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

    result = evaluate(args.run, split=args.split, max_tokens=args.max_tokens, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']}: {result['bits_per_dim']:.4f} bits per dim over {result['tokens']:,} tokens")
    return 0


def cmd_sample(args) -> int:
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


def cmd_bench(args) -> int:
    if args.what == "attention":
        from .bench.attention import run
    elif args.what == "train":
        from .bench.train import run
    else:
        from .bench.sample import run
    return run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparse-transformer",
        description="Sparse Transformer: patterns, training, bits per dim, sampling, benchmarks",
    )
    sub = p.add_subparsers(dest="command", required=True)

    from .data.prepare import KINDS

    sp = sub.add_parser("prepare", help="raw data -> train.bin/val.bin/test.bin + meta.json")
    sp.add_argument("kind", choices=KINDS)
    sp.add_argument("--src", default=None, help="file or folder (enwik8 and cifar10 download when omitted)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--rate", type=int, default=12000, help="audio sample rate in Hz")

    sp = sub.add_parser(
        "train",
        help="train a model (no arguments: the embedded default data)",
        epilog="Any config value can be overridden: --section.key VALUE, e.g. --train.max_steps 100",
    )
    sp.add_argument("--config", default=None, help="a TOML preset, e.g. configs/enwik8.toml")
    sp.add_argument("--run-dir", default=None, help="where to write the run (default runs/<time>)")
    sp.add_argument("--resume", default=None, metavar="DIR", help="continue this run to its configured end")

    sp = sub.add_parser("eval", help="bits per dim of a trained run")
    sp.add_argument("--run", required=True)
    sp.add_argument("--split", default="test", choices=("train", "val", "test"))
    sp.add_argument("--max-tokens", type=int, default=None)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--json", action="store_true", help="print one JSON object")

    sp = sub.add_parser("sample", help="draw samples from a trained run")
    sp.add_argument("--run", required=True)
    sp.add_argument("--num", type=int, default=1, help="samples, drawn together in one batch")
    sp.add_argument("--length", type=int, default=0, help="tokens per sample (0 = the model's context)")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--prefix", default=None, help="a file whose bytes begin every sample (completions)")
    sp.add_argument("--out", default=None, help="output folder (default RUN/samples)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-graphs", action="store_true", help="CUDA: run the decoding step eagerly, not as a CUDA graph")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decoding step (long samples on CUDA)")

    sp = sub.add_parser("layout", help="print and draw an attention pattern")
    sp.add_argument("--pattern", required=True, choices=("dense", "local", "strided", "fixed"))
    sp.add_argument("--n", type=int, required=True)
    sp.add_argument("--stride", type=int, default=None, help="l (for local: the window)")
    sp.add_argument("--c", type=int, default=None)
    sp.add_argument("--num-verts", type=int, default=1)
    sp.add_argument("--part", default="both")
    sp.add_argument("--integration", default="merged", choices=("merged", "interleaved", "multihead"))
    sp.add_argument("--layer", type=int, default=0, help="layer index (interleaved)")
    sp.add_argument("--head", type=int, default=0)
    sp.add_argument("--block", type=int, default=None, help="draw the block layout at this block size")
    sp.add_argument("--png", default=None)

    sp = sub.add_parser("plot", help="validation bits per dim of runs against training time and step (PNG)")
    sp.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    sp.add_argument("--out", required=True, help="the PNG to write")
    sp.add_argument("--title", default=None)
    sp.add_argument("--unit", default="bits per dim", help="y-axis unit, e.g. 'bits per byte'")
    sp.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="LABEL=BITS",
        help="a horizontal reference line, e.g. 'xz -9e=2.09' (repeatable)",
    )

    sp = sub.add_parser("bench", help="benchmarks: attention kernels, training steps, sampling")
    bsub = sp.add_subparsers(dest="what", required=True)
    from .bench import attention as bench_attention, sample as bench_sample, train as bench_train

    bench_attention.add_arguments(bsub.add_parser("attention", help="backends x patterns x n, fwd and fwd+bwd"))
    bench_train.add_arguments(bsub.add_parser("train", help="training-step tokens/s, sparse vs dense"))
    bench_sample.add_arguments(
        bsub.add_parser("sample", help="sampling speed: cached vs uncached (CPU), decoding modes (CUDA)")
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {
            "prepare": cmd_prepare,
            "eval": cmd_eval,
            "sample": cmd_sample,
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
