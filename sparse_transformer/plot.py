"""``sparse-transformer plot``: validation bits per dim of runs against training time and steps.

Reads each run folder's ``metrics.jsonl`` (the validation records written by ``train``) and draws two
panels with matplotlib: bits per dim against training time (``train_s``: optimizer steps only, no
evaluation or compilation; the equal-wall-clock comparison of the paper's §7, Table 2) and against
the optimizer step. matplotlib is imported only here (``pip install matplotlib``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import BAD_JSON, UserError
from .paths import atomic_output, check_output_file


def read_curve(run: str | Path) -> dict:
    """The validation curve of one run.

    Returns:
        dict with ``name`` (the folder name), ``step``, ``train_s`` (seconds of training, or the
        wall-clock ``elapsed_s`` for runs written before ``train_s`` was logged), ``val`` (bits per
        dim) lists, ``test`` (the final test bits per dim, or None) and ``unit`` (what the run
        calls it: ``"bits per byte"`` or ``"bits per dim"``; None for runs that predate the field).
    Raises:
        UserError: the folder has no ``metrics.jsonl`` or it holds no validation record.
    """
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"plot: {run} has no metrics.jsonl; pass run folders written by sparse-transformer train")
    curve = {"name": Path(run).resolve().name, "step": [], "train_s": [], "val": [], "test": None, "unit": None}
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except BAD_JSON:
            if n == len(lines) and not text.endswith("\n"):
                continue  # a record being written (the run is training) or cut by a kill: not one yet
            raise UserError(f"plot: {path} line {n} is not JSON; remove the damaged line") from None
        curve["unit"] = rec.get("unit", curve["unit"])
        if "val_bits_per_dim" in rec:
            curve["step"].append(rec["step"])
            curve["train_s"].append(rec.get("train_s", rec.get("elapsed_s", 0.0)))
            curve["val"].append(rec["val_bits_per_dim"])
        elif "test_bits_per_dim" in rec:
            curve["test"] = rec["test_bits_per_dim"]
    if not curve["val"]:
        raise UserError(f"plot: {path} holds no validation record; train with --train.eval_every N")
    return curve


def plot_runs(
    runs: list[str | Path],
    out: str | Path,
    title: str | None = None,
    baselines: dict[str, float] | None = None,
    unit: str | None = None,
) -> Path:
    """Draw the validation curves of ``runs`` into the PNG ``out``; ``baselines`` maps a label (e.g.
    ``"xz -9e"``) to a bits-per-dim value drawn as a horizontal line. ``unit`` names the y axis;
    None takes the runs' own (bits per byte for text and audio, bits per dim for images; "bits per
    dim" when they differ or do not say). Returns the written path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot: matplotlib is not installed; pip install matplotlib") from None
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = {f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes()}
    out = check_output_file(out, "plot: --out", (".png", *sorted(kinds - {".png"})))
    curves = [_checked_curve(r) for r in runs]
    if unit is None:
        units = {c["unit"] for c in curves}
        unit = units.pop() if len(units) == 1 and None not in units else "bits per dim"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for c in curves:
        label = c["name"] + (f" (test {c['test']:.3f})" if c["test"] is not None else "")
        axes[0].plot([s / 60 for s in c["train_s"]], c["val"], marker=".", label=label)
        axes[1].plot(c["step"], c["val"], marker=".", label=label)
    for ax, xlabel in zip(axes, ("training time (minutes, evaluation and compilation excluded)", "optimizer step")):
        for name, value in (baselines or {}).items():
            ax.axhline(value, color="gray", linestyle="--", linewidth=0.8)
            ax.annotate(name, (ax.get_xlim()[0], value), ha="left", va="bottom", fontsize=8, color="gray")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {unit}")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def _checked_curve(run: str | Path) -> dict:
    """:func:`read_curve`, with every record it used checked: numbers where numbers belong."""
    try:
        curve = read_curve(run)
    except (AttributeError, KeyError, TypeError, UnicodeDecodeError) as e:  # a line that is not a record of train's
        raise UserError(
            f"plot: {Path(run) / 'metrics.jsonl'} holds a line that is not a training record ({type(e).__name__}: "
            f"{e}); pass run folders written by sparse-transformer train"
        ) from None
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    values = [*curve["step"], *curve["train_s"], *curve["val"]] + ([] if curve["test"] is None else [curve["test"]])
    if not all(number(x) for x in values) or not isinstance(curve["unit"], (str, type(None))):
        raise UserError(
            f"plot: {Path(run) / 'metrics.jsonl'} holds a record whose step, time, bits or unit is not a number "
            "(or text); pass run folders written by sparse-transformer train"
        )
    return curve
