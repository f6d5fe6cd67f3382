"""Configuration: nested dataclasses are the single schema; TOML presets; dotted CLI overrides.

``load_config("enwik8")`` reads a preset that ships inside the package (``preset_names()`` lists them;
a path to any TOML file works the same way) over the defaults; ``apply_overrides(cfg,
["--model.n_layer", "2", "--train.device=cpu"])`` changes single values. Unknown sections or keys and
values of the wrong type raise :class:`~sparse_transformer.errors.UserError` naming the key and the
fix.

The field types are the schema: a ``Literal[...]`` field (pattern, part, integration, position,
backend, dtype, parallel) allows exactly its values, and both :func:`set_value` (and so TOML files
and ``--section.key`` overrides) and :func:`validate` check them against the type; the command
line reads its choices from the same types (:func:`choices`). Device names take
the forms of :data:`DEVICE_FORMS` (:func:`is_device_name`).

``model.n_ctx`` is derived, not set: it always equals ``data.seq_len``. :func:`_derive` writes it,
when a :class:`Config` is built and whenever :func:`set_value` changes a value; ``--model.n_ctx`` is
refused, a file's ``model.n_ctx`` (config.json records it) must agree with its ``data.seq_len``,
and :func:`validate` only checks, it changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


PatternName = Literal["dense", "local", "strided", "fixed"]  # the paper's patterns (§4.2-4.3, docs/method.md §2-3)
Part = Literal["both", "local", "stride", "block", "summary"]  # which parts of strided / fixed
Integration = Literal["merged", "interleaved", "multihead"]  # paper §5.1, docs/method.md §4
Position = Literal["grid", "image"]  # grid: row/column of the width-l grid; image: row/column/channel
Backend = Literal["auto", "reference", "factorized", "triton", "flex", "sdpa"]  # sparse_transformer.attention
Precision = Literal["bf16", "fp16", "fp32"]  # a computation dtype (sparse_transformer.runtime.DTYPES)
Dtype = Literal["auto", Precision]  # auto = bf16 on CUDA, fp32 elsewhere
Parallel = Literal["ddp", "fsdp"]  # data parallelism under torchrun (parallel.py)
Modality = Literal["", "text", "image", "audio"]  # "" = not recorded (then the data's meta.json says)
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")  # auto = CUDA when available, else CPU
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass
class ModelConfig:
    """The Sparse Transformer (paper §5.2-5.3, docs/method.md §5). Defaults: the small text model of the default run."""

    vocab_size: int = 256
    n_layer: int = 3
    d_model: int = 96
    n_head: int = 8  # the default run: 8 heads of 12 learned faster than 4 of 24 (docs/results.md)
    n_ctx: int = 256  # sequence length: derived, always data.seq_len (see the module docstring)
    ff_mult: float = 4.0  # feed-forward width = ff_mult * d_model (paper: 4, or 2 for "half-size")
    qk_ratio: float = 1.0  # query/key width = qk_ratio * d_model (paper: 1, or 0.5 on CIFAR-10)
    dropout: float = 0.0  # on each residual branch output (no attention-probability dropout)
    pattern: PatternName = "fixed"
    stride: int = 32  # l (for local: the window); also the width of the text/audio position grid
    c: int = 8  # fixed: summary cells per block
    num_verts: int = 1  # fixed: distinct per-head summary sub-blocks
    part: Part = "both"
    integration: Integration = "merged"
    position: Position = "grid"  # grid for text and audio, image for images
    image_shape: list[int] = field(default_factory=list)  # [height, width, channels] for position="image"
    checkpoint: bool = False  # recompute each block in the backward pass (applied by parallel.py)
    backend: Backend = "auto"
    ln_eps: float = 1e-5
    bias: bool = False  # biases in the blocks' linear layers (W_qkv, W_p, W_1, W_2); they slow Adam (docs/results.md)


@dataclass
class DataConfig:
    dir: str = ""  # a folder written by `sparse-transformer prepare`; "" = the embedded default
    seq_len: int = 128
    # Copied from the data's meta.json when training starts, so that an exported config.json alone
    # says how to write samples: "" / [] / 0 = not recorded (then meta.json is read).
    modality: Modality = ""
    shape: list[int] = field(default_factory=list)  # [height, width, channels] of image data
    sample_rate: int = 0  # Hz, audio data


@dataclass
class TrainConfig:
    """Defaults: the default run (4,000 steps of 16 x 128 bytes, 4 to 4 3/4 minutes on 2 idle CPU cores,
    2.444 test bits per byte; many small steps beat fewer large ones there). The presets set what they
    need and keep Adam's beta2 = 0.999."""

    device: str = "auto"  # one of DEVICE_FORMS
    dtype: Dtype = "auto"
    batch_size: int = 16  # sequences per step per process (before accumulation)
    grad_accum: int = 1
    max_steps: int = 4000
    max_minutes: float = 0.0  # > 0: also stop after this many minutes of training (schedule over the budget)
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.01  # decoupled (AdamW), matrices only
    beta1: float = 0.9
    beta2: float = 0.95  # short runs: the second moments follow the fast-changing early gradients
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 1000
    eval_batches: int = 10  # 0 = the whole validation split
    test_tokens: int = 0  # bytes of the test split scored at the end; 0 = all of it
    log_every: int = 20
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # the newest checkpoints kept in the run folder (older ones removed after a save)
    max_bad_steps: int = 8  # stop (exit status 2) after this many skipped steps in a row (non-finite loss/grad)
    seed: int = 1337
    compile: bool = False
    parallel: Parallel = "ddp"
    progress: bool = True
    wandb: str = ""  # a Weights & Biases project to log to ("" = off; needs pip install wandb)
    peak_tflops: float = 0.0  # peak TFLOP/s of one accelerator for MFU; 0 = known GPUs' bf16 peak (flops.py)


@dataclass
class SampleConfig:
    num: int = 1
    length: int = 0  # tokens to generate; 0 = data.seq_len
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        _derive(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
DERIVED = ("model.n_ctx",)  # keys computed from others by _derive, never set


def _derive(cfg: Config) -> None:
    """The one place derived fields are written: ``model.n_ctx = data.seq_len``."""
    cfg.model.n_ctx = cfg.data.seq_len


def choices(section: type, key: str) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` field, e.g. ``choices(ModelConfig, "pattern")`` ->
    ``("dense", "local", "strided", "fixed")``; the command line's ``choices=`` read this.

    Raises:
        KeyError: ``key`` is not a field of ``section``; TypeError: the field is not a Literal.
    """
    return literal_values(typing.get_type_hints(section)[key])


def literal_values(typ) -> tuple[str, ...]:
    """The values of a ``Literal`` type (nested Literals flattened), e.g. of :data:`Precision`.

    Raises:
        TypeError: ``typ`` is not a Literal.
    """
    if typing.get_origin(typ) is not Literal:
        raise TypeError(f"{typ} is not a Literal type")
    return typing.get_args(typ)


def is_device_name(name) -> bool:
    """Whether ``name`` has one of the forms of :data:`DEVICE_FORMS` (``cuda:N``: any index N)."""
    return isinstance(name, str) and _DEVICE.fullmatch(name) is not None


def _coerce(section: str, key: str, value, typ):
    """Convert ``value`` (TOML value or CLI string) to the field type ``typ``, or raise UserError."""
    where = f"{section}.{key}"
    origin = typing.get_origin(typ)
    if origin is Literal:
        if value not in typing.get_args(typ):
            raise UserError(
                f"config: {where} = {value!r}; choose one of {', '.join(repr(a) if a == '' else a for a in typing.get_args(typ))}"
            )
        return value
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.replace("_", "")) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").split(",") if v.strip()] if value.strip() else []
            (inner,) = typing.get_args(typ)
            return [_coerce(section, key, v, inner) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unsupported config type {typ} for {where}")  # schema bug, not user input
    name = getattr(typ, "__name__", str(typ))
    raise UserError(f"config: {where} = {value!r} is not a valid {name}; e.g. --{where} {_example(typ)}")


def _example(typ):
    return {bool: "true", int: "8", float: "0.001", str: "text"}.get(typ, "32,32,3")


def _fields(section_obj):
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def set_value(cfg: Config, dotted: str, value) -> None:
    """Set ``section.key`` to ``value`` (converted to the field's type)."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise UserError(
            f"config: unknown key {dotted!r}; keys look like section.key with section one of {', '.join(SECTIONS)}"
        )
    obj = getattr(cfg, section)
    fields = _fields(obj)
    if key not in fields:
        raise UserError(f"config: unknown key {dotted!r}; {section} has {', '.join(fields)}")
    if dotted in DERIVED:
        raise UserError(f"config: {dotted} is derived from data.seq_len; set --data.seq_len instead")
    setattr(obj, key, _coerce(section, key, value, fields[key]))
    _derive(cfg)


@contextlib.contextmanager
def _origin(origin: str):
    """Name the file in the UserErrors raised inside: ``config: ...`` becomes ``config FILE: ...``."""
    try:
        yield
    except UserError as e:
        raise UserError(re.sub(r"^config: ", f"config {origin}: ", str(e))) from None


def _apply_table(cfg: Config, table: dict, origin: str) -> None:
    """Set every ``[section] key = value`` of a TOML or JSON table; a derived key (config.json
    records ``model.n_ctx``) is not set but must agree with what it is derived from."""
    derived = {}
    if not isinstance(table, dict):
        raise UserError(
            f"config {origin}: holds a {type(table).__name__}, not sections such as [model] and [train]; fix the file"
        )
    for section, values in table.items():
        if section not in SECTIONS:
            raise UserError(
                f"config {origin}: unknown section [{section}]; use {', '.join('[' + s + ']' for s in SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise UserError(
                f"config {origin}: {section} = {values!r} is not a section; write [{section}] and its keys below it"
            )
        for key, value in values.items():
            if f"{section}.{key}" in DERIVED:
                derived[f"{section}.{key}"] = value
            else:
                with _origin(origin):
                    set_value(cfg, f"{section}.{key}", value)
    if "model.n_ctx" in derived and derived["model.n_ctx"] != cfg.data.seq_len:
        raise UserError(
            f"config {origin}: model.n_ctx = {derived['model.n_ctx']!r} differs from data.seq_len = "
            f"{cfg.data.seq_len}; n_ctx is derived from data.seq_len: drop it or make them equal"
        )


def _check_choices(cfg: Config) -> None:
    """Every Literal field holds one of its values (also for a Config built in code)."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for key, typ in _fields(obj).items():
            if typing.get_origin(typ) is Literal and getattr(obj, key) not in typing.get_args(typ):
                raise UserError(
                    f"config: {section}.{key} = {getattr(obj, key)!r}; choose one of {', '.join(typing.get_args(typ))}"
                )


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows: ``low <= v <= high`` (``<`` with ``low_open`` / ``high_open``;
    None = unbounded) and ``fix``, the usual choice a message suggests."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    fix: str = ""

    def __contains__(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        num = lambda x: "2**63 - 1" if x == 2**63 - 1 else f"{x:g}"
        if self.low is not None and self.high is not None:
            return (
                f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {num(self.high)}"
        return "any number"


SEED_MAX = 2**63 - 1  # seeds go to torch.manual_seed and numpy's default_rng, which refuse negative ones
INT_MAX = 2**63 - 1  # every int field fits int64 (torch and numpy take them)

# The numeric fields' ranges, the one table validate() checks (Range.fix: the usual value). Every int
# field also fits int64 and every float field is finite; cross-field rules are in validate() below.
RANGES: dict[str, Range] = {
    "model.vocab_size": Range(256, fix="256: every modality is bytes, so the model needs at least 256 tokens"),
    "model.n_layer": Range(1),
    "model.d_model": Range(1),
    "model.n_head": Range(1),
    "model.ff_mult": Range(0, low_open=True, fix="4 (the paper), or 2 for half-size"),
    "model.qk_ratio": Range(0, low_open=True, fix="1.0 or 0.5"),
    "model.dropout": Range(0, 1, high_open=True, fix="0 (none) or e.g. 0.1"),
    "model.stride": Range(1),
    "model.c": Range(1),
    "model.num_verts": Range(1),
    "model.ln_eps": Range(0, low_open=True, fix="1e-5"),
    "data.seq_len": Range(1),
    "data.sample_rate": Range(0, fix="0 (not recorded) or the data's rate in Hz"),
    "train.batch_size": Range(1),
    "train.grad_accum": Range(1),
    "train.max_steps": Range(1),
    "train.max_minutes": Range(0, fix="0 (off) or a positive budget in minutes"),
    "train.lr": Range(0, low_open=True, fix="e.g. 3e-4 or 1e-3"),
    "train.warmup_steps": Range(0),
    "train.min_lr_ratio": Range(0, 1, fix="0 (decay to zero) or e.g. 0.1"),
    "train.weight_decay": Range(0, fix="0 (none) or e.g. 0.01"),
    "train.beta1": Range(0, 1, high_open=True, fix="0.9"),
    "train.beta2": Range(0, 1, high_open=True, fix="0.95 or 0.999"),
    "train.eps": Range(0, low_open=True, fix="1e-8"),
    "train.grad_clip": Range(0, fix="0 (off) or e.g. 1.0"),
    "train.eval_every": Range(0, fix="0 (only at the end) or a number of steps"),
    "train.eval_batches": Range(0, fix="0 (the whole validation split) or a number of batches"),
    "train.test_tokens": Range(0, fix="0 (the whole test split) or a number of bytes"),
    "train.log_every": Range(1),
    "train.checkpoint_every": Range(0, fix="0 (only at the end) or a number of steps"),
    "train.seed": Range(0, SEED_MAX),
    "train.peak_tflops": Range(0, fix="0 (known GPUs) or the accelerator's peak TFLOP/s"),
    "train.keep_checkpoints": Range(1, fix="2 (the newest two)"),
    "train.max_bad_steps": Range(1, fix="8"),
    "sample.num": Range(1),
    "sample.length": Range(0, fix="0 (the model's context) or a number of bytes"),
    "sample.temperature": Range(0, fix="0 (greedy) or 1 (the model's distribution)"),
    "sample.top_k": Range(0, fix="0 (no truncation) or e.g. 40"),
    "sample.seed": Range(0, SEED_MAX),
}


def _check_ranges(cfg: Config) -> None:
    """Every numeric field is finite, fits int64 (ints) and lies in its :data:`RANGES` entry."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for key, typ in _fields(obj).items():
            where, value = f"{section}.{key}", getattr(obj, key)
            if typ not in (int, float):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"config: {where} = {value!r} is not a number; e.g. --{where} {_example(typ)}")
            rng = RANGES.get(where, Range())
            bound = "" if rng == Range() else f" {rng.describe()}"
            if typ is int and not -INT_MAX <= value <= INT_MAX:
                raise UserError(f"config: {where} = {value} is too large; use a value{bound} below 2**63")
            if not math.isfinite(value):
                raise UserError(f"config: {where} = {value} is not a finite number; use a finite value{bound}")
            if value not in rng:
                fix = rng.fix or f"e.g. {getattr(type(obj)(), key)} (the default)"
                raise UserError(f"config: {where} = {value!r} must be {rng.describe()}; use {fix}")


def validate(cfg: Config) -> Config:
    """Check the schema's choices, the numeric ranges (:data:`RANGES`) and the cross-field rules;
    returns ``cfg`` unchanged.

    Raises:
        UserError: naming the first bad value and the fix.
    """
    _check_choices(cfg)
    _check_ranges(cfg)
    m = cfg.model
    if m.n_ctx != cfg.data.seq_len:
        raise UserError(
            f"config: model.n_ctx = {m.n_ctx} differs from data.seq_len = {cfg.data.seq_len}; n_ctx is "
            "derived: change data.seq_len with set_value or --data.seq_len"
        )
    if m.d_model % m.n_head:
        raise UserError(f"config: model.d_model = {m.d_model} is not divisible by model.n_head = {m.n_head}")
    d_qk = m.d_model * m.qk_ratio
    if d_qk != int(d_qk) or int(d_qk) % m.n_head or d_qk < m.n_head:
        raise UserError(
            f"config: model.qk_ratio = {m.qk_ratio} gives a query/key width {d_qk} not divisible by n_head = {m.n_head}; use 1.0 or 0.5"
        )
    if int(m.ff_mult * m.d_model) < 1:
        raise UserError(
            f"config: model.ff_mult = {m.ff_mult} gives a feed-forward width of 0 at d_model = {m.d_model}; use 4 or 2"
        )
    d = cfg.data
    if (d.shape or d.modality == "image") and (len(d.shape) != 3 or min(d.shape) < 1):
        raise UserError(
            f"config: data.shape = {d.shape} must be [height, width, channels] (e.g. 32,32,3) for images, else []"
        )
    if cfg.sample.length > d.seq_len:
        raise UserError(
            f"config: sample.length = {cfg.sample.length} is longer than the model's context data.seq_len = "
            f"{d.seq_len}; use at most {d.seq_len} (0 = all of it)"
        )
    if d.modality == "audio" and d.sample_rate < 1:
        raise UserError(f"config: data.sample_rate = {d.sample_rate}: audio data need their rate in Hz, e.g. 12000")
    if (m.position == "image" or m.image_shape) and (len(m.image_shape) != 3 or min(m.image_shape) < 1):
        raise UserError(f"config: model.image_shape = {m.image_shape} must be [height, width, channels], e.g. 32,32,3")
    if m.position == "image":
        size = m.image_shape[0] * m.image_shape[1] * m.image_shape[2]
        if size != cfg.data.seq_len:
            raise UserError(
                f"config: data.seq_len = {cfg.data.seq_len} must equal one image ({'x'.join(map(str, m.image_shape))} = {size})"
            )
    if m.backend == "sdpa" and m.pattern != "dense":
        raise UserError(
            f"config: model.backend = 'sdpa' computes only the dense pattern, not {m.pattern}; use auto or factorized"
        )
    try:
        from . import patterns  # torch: imported when a config is checked, not to build the CLI

        patterns.from_name(m.pattern, m.stride, m.c, m.num_verts, m.part, m.integration)
    except ValueError as e:
        raise UserError(f"config: {e}") from None
    t = cfg.train
    if not is_device_name(t.device):
        raise UserError(f"config: train.device = {t.device!r}; use one of {', '.join(DEVICE_FORMS)}")
    return cfg


def preset_names() -> list[str]:
    """Names of the presets that ship inside the package (``sparse_transformer/configs/NAME.toml``), sorted."""
    folder = resources.files(__package__) / "configs"
    return sorted(f.name[: -len(".toml")] for f in folder.iterdir() if f.name.endswith(".toml"))


def read_preset(name_or_path: str | Path) -> tuple[str, str]:
    """The TOML text of a preset and where it came from.

    ``name_or_path`` is a TOML file that exists, or a preset name (``"enwik8"``, also ``"enwik8.toml"``).
    ``configs/NAME.toml`` (where the presets lived in the repository before they moved into the
    package) resolves to the packaged preset when no such file exists, so older commands keep working
    from any directory.

    Returns:
        ``(text, origin)``: the file's text and the path or ``preset NAME`` it was read from.
    Raises:
        UserError: neither an existing file nor a preset name (the message lists the names).
    """
    p = Path(name_or_path)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8-sig"), str(p)  # a BOM (Windows editors) is not TOML: dropped
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config: cannot read {p} ({e}); pass a readable TOML file") from None
    names = preset_names()
    stem = p.name[: -len(".toml")] if p.name.endswith(".toml") else p.name
    bare = len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == "configs")
    if bare and stem in names:
        return (resources.files(__package__) / "configs" / f"{stem}.toml").read_text(), f"preset {stem}"
    if p.is_dir():
        raise UserError(f"config: {p} is a folder; pass a TOML file or one of the presets {', '.join(names)}")
    raise UserError(
        f"config: {name_or_path} is neither a TOML file nor a preset; pass a file or one of the "
        f"presets {', '.join(names)}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset or TOML file (if any), then ``overrides`` (``--section.key value``).

    Args:
        path: a preset name such as ``"enwik8"`` (see :func:`preset_names`), a path to a TOML file, or None.
        overrides: ``["--model.n_layer", "2", "--train.device=cpu", ...]``.
    Raises:
        UserError: unknown preset or missing file, invalid TOML, unknown keys, values of the wrong type.
    """
    cfg = Config()
    if path is not None:
        text, origin = read_preset(path)
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config: {origin} is not valid TOML ({e}); fix the file") from None
        _apply_table(cfg, table, origin)
    apply_overrides(cfg, overrides or [])
    return validate(cfg)


def apply_overrides(cfg: Config, args: list[str]) -> Config:
    """Apply ``["--model.n_layer", "2", "--train.device=cpu", ...]`` in order."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise UserError(
                f"unrecognized argument {arg!r}; overrides look like --section.key VALUE (e.g. --train.max_steps 100)"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"override {arg} needs a value, e.g. {arg} 8")
            key, value = arg[2:], args[i + 1]
            i += 2
        set_value(cfg, key, value)
    return cfg


def data_meta(cfg: Config) -> dict:
    """What writing samples needs to know about a run's data: ``modality``, ``shape`` ([H, W, C] or
    None) and ``sample_rate`` (Hz or None).

    From the config when it recorded them (every run trained since they were added, and its export),
    else from ``data.dir``'s meta.json (raises UserError when that is missing), else text (the
    embedded default data).
    """
    d = cfg.data
    if d.modality:
        return {"modality": d.modality, "shape": list(d.shape) or None, "sample_rate": d.sample_rate or None}
    if d.dir:
        from .data.loader import read_meta

        return read_meta(d.dir)
    return {"modality": "text", "shape": None, "sample_rate": None}


def config_for_model(m: ModelConfig) -> Config:
    """The whole Config of a model built from its ``ModelConfig`` alone (not from a run's Config): ``m``
    itself as the model section, ``data.seq_len = m.n_ctx``, image data of ``m.image_shape`` for image
    positions (else the modality stays unrecorded: text), defaults elsewhere. What
    ``SparseTransformer.save_pretrained`` writes for such a model."""
    data = DataConfig(seq_len=m.n_ctx)
    if m.position == "image":
        data.modality, data.shape = "image", list(m.image_shape)
    return Config(model=m, data=data)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a run's config.json)."""
    cfg = Config()
    _apply_table(cfg, d, "config.json")
    with _origin("config.json"):
        return validate(cfg)
