"""The ``sparse-transformer`` command: argument parsing, then one function per subcommand.

Bad input ends with one line on stderr naming the problem and the fix, and exit status 2. Building
the parser imports neither torch nor the benchmarks (each subcommand imports what it runs), so
``--help`` answers at once; ``bench WHAT`` builds its options when it runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from pathlib import Path

from .config import ModelConfig, choices
from .errors import UserError, first_line
from .paths import atomic_output, check_output_file

LAYOUT_MAX_N = 2**24  # layout computes per-query key counts of length n


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (problem, then where the options are listed), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


# The fix for an OSError a command meets (a path that cannot be written, a full disk), by errno.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space on that disk or write elsewhere",
    errno.EDQUOT: "free some of your quota or write elsewhere",
    errno.EROFS: "choose a path on a writable file system",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
    errno.EISDIR: "it is a folder: pass the path of a file",
    errno.EEXIST: "a file of that name is in the way: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error_line(e: OSError) -> str:
    """An OSError that reached the command line as one line: what failed, on which path, and the fix."""
    path = f" ({e.filename})" if e.filename else ""
    fix = OS_ERROR_FIXES.get(e.errno, "check the path and the disk")
    return f"{e.strerror or e}{path}; {fix}, then run the command again"


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError, or torch's CPU/CUDA allocator errors (RuntimeError subclasses)."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and re.search(r"out of memory|not enough memory|can't allocate", str(e)) is not None
    )


def at_least(low: int):
    """An argparse ``type``: an integer of at least ``low`` (refused with a one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def device_arg(text: str) -> str:
    """An argparse ``type`` for a ``--device`` that this machine has (imports torch: for options
    built when a command runs, such as the benchmarks')."""
    from .runtime import resolve_device

    try:
        resolve_device(text, option="--device")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def cmd_prepare(args) -> int:
    from .data.prepare import prepare

    if args.rate <= 0:
        raise UserError(f"prepare: --rate {args.rate} must be a positive sample rate in Hz, e.g. 12000")
    meta = prepare(args.kind, args.src, args.out, rate=args.rate)
    sizes = ", ".join(f"{k} {v:,}" for k, v in meta["splits"].items())
    print(f"wrote {args.out}: {sizes} bytes ({meta['modality']})")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from .config import load_config
    from .train import Stopped, train

    try:
        if args.resume:
            if args.config:
                raise UserError(
                    "train: --resume continues a run with its saved config; drop --config (overrides are allowed)"
                )
            train(None, run_dir=args.resume, resume=args.resume, overrides=overrides)
        else:
            train(load_config(args.config, overrides), run_dir=args.run_dir)
    except Stopped as e:  # SIGTERM / SIGINT: train printed where it stopped and how to resume
        return e.exit_status
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
    from .options import keywords
    from .sample import sample_command

    renamed = {"prefix_file": args.prefix, "out_dir": args.out, "graphs": False if args.no_graphs else None}
    paths = sample_command(**keywords(sample_command, args, **renamed, overrides=overrides))
    for p in paths:
        print(p)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import load_model

    if os.path.realpath(args.out) == os.path.realpath(args.run):  # it would rewrite the run's own config.json
        raise UserError(f"export: --out {args.out} is the folder being exported (--run); choose another folder")
    model, _ = load_model(args.run)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: config.json, model.safetensors, README.md (model card)")
    return 0


def cmd_layout(args) -> int:
    from . import patterns

    if args.pattern != "dense" and args.stride is None:
        raise UserError(f"layout: --pattern {args.pattern} needs --stride (l; for local the window), e.g. --stride 128")
    if args.pattern == "fixed" and args.c is None:
        raise UserError("layout: --pattern fixed needs --c (summary cells per block), e.g. --c 32")
    try:
        pattern = patterns.from_name(args.pattern, args.stride, args.c, args.num_verts, args.part, args.integration)
    except ValueError as e:
        raise UserError(f"layout: {e}") from None
    if not 1 <= args.n <= LAYOUT_MAX_N:
        raise UserError(f"layout: --n {args.n} must be from 1 to {LAYOUT_MAX_N:,} (2**24)")
    for option, value, low in (("--layer", args.layer, 0), ("--head", args.head, 0), ("--block", args.block, 1)):
        if value is not None and value < low:
            raise UserError(f"layout: {option} {value} must be at least {low}")
    if args.png:
        from PIL import Image

        Image.init()
        kinds = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.SAVE}
        check_output_file(args.png, "layout: --png", (".png", *sorted(kinds - {".png"})))
    pattern = pattern.for_layer(args.layer)
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
        with atomic_output(args.png) as tmp:
            img.save(tmp)
        print(f"wrote {args.png} ({img.width}x{img.height})")
    return 0


def cmd_plot(args) -> int:
    import math

    from .plot import plot_runs

    baselines = {}
    for item in args.baseline:
        label, sep, value = item.rpartition("=")
        try:
            baselines[label] = float(value)
        except ValueError:
            raise UserError(f"plot: --baseline {item!r} must look like LABEL=BITS, e.g. 'xz -9e=2.09'") from None
        if not sep or not label or not math.isfinite(baselines[label]):
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
    "tiles": "tile sweep of the Triton kernels per launch role, or (--profile) every launch against the card's ceilings "
    "(CUDA), or (--sass, no GPU) every launch's registers, spills and wgmma waits compiled for sm_90",
}


def cmd_bench(args) -> int:
    import importlib

    module = importlib.import_module(f".bench.{args.what}", __package__)
    p = Parser(prog=f"sparse-transformer bench {args.what}", description=BENCHES[args.what])
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

    p = Parser(
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
    sp.add_argument(
        "--length", type=int, default=None, help="bytes per sample, a --prefix included (0 = the model's context)"
    )
    sp.add_argument("--temperature", type=float, default=None, help="(run's sample.temperature)")
    sp.add_argument("--top-k", type=int, default=None, help="(run's sample.top_k; 0 = no truncation)")
    sp.add_argument("--prefix", default=None, help="a file whose bytes begin every sample (completions)")
    sp.add_argument("--out", default=None, help="output folder (default RUN/samples)")
    sp.add_argument("--seed", type=int, default=None, help="(run's sample.seed)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-graphs", action="store_true", help="CUDA: run the decoding step eagerly, not as a CUDA graph")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decoding step (long samples on CUDA)")

    sp = sub.add_parser(
        "export",
        help="write a run's latest weights as an export to share (config.json + model.safetensors + model card)",
        epilog="The folder loads with SparseTransformer.from_pretrained(OUT) and works with eval/sample --run OUT; "
        "model.push_to_hub(REPO) uploads it.",
    )
    sp.add_argument(
        "--run", required=True, help="a run directory (its latest checkpoint, else its export) or an export"
    )
    sp.add_argument("--out", required=True, help="the folder to write")

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
            "export": cmd_export,
            "layout": cmd_layout,
            "plot": cmd_plot,
            "bench": cmd_bench,
        }[args.command](args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even when a library's message is not
        return 2
    except OSError as e:  # a path that cannot be written or read, a full disk: the user's to fix
        print("error: " + " ".join(os_error_line(e).split()), file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        first = first_line(e)
        print(
            f"error: out of memory ({first}); ask for less: a smaller model, batch (--train.batch_size), "
            "--num or --length",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def console(argv: list[str] | None = None) -> None:
    """The ``sparse-transformer`` command and ``python -m sparse_transformer``: :func:`main`, then exit
    with its status.

    A torchrun worker (``WORLD_SIZE`` > 1) leaves with ``os._exit`` once its output is flushed,
    without the interpreter's finalization: gloo's worker threads can outlive
    ``destroy_process_group`` (see :func:`~sparse_transformer.parallel.shutdown`), and one that asks
    for the GIL while the interpreter finalizes aborts the process (SIGABRT, "terminate called
    without an active exception") after a run that succeeded. By then ``train`` has closed every
    file it wrote (checkpoints, exports, metrics, TensorBoard, W&B) and left the process group.
    """
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
