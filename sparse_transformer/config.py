"""Configuration: nested dataclasses are the single schema; TOML presets; dotted CLI overrides.

``load_config("configs/enwik8.toml")`` reads a preset over the defaults; ``apply_overrides(cfg,
["--model.n_layer", "2", "--train.device=cpu"])`` changes single values. Unknown sections or keys and
values of the wrong type raise :class:`~sparse_transformer.errors.UserError` naming the key and the
fix. ``model.n_ctx`` always equals ``data.seq_len`` (one length, set in one place).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ModelConfig:
    """The Sparse Transformer (paper §5.2-5.3, docs/method.md §5). Defaults: the small text model of the default run."""

    vocab_size: int = 256
    n_layer: int = 3
    d_model: int = 96
    n_head: int = 4
    n_ctx: int = 256  # sequence length; set from data.seq_len by the loader
    ff_mult: float = 4.0  # feed-forward width = ff_mult * d_model (paper: 4, or 2 for "half-size")
    qk_ratio: float = 1.0  # query/key width = qk_ratio * d_model (paper: 1, or 0.5 on CIFAR-10)
    dropout: float = 0.0  # on each residual branch output (no attention-probability dropout)
    pattern: str = "fixed"  # dense | local | strided | fixed
    stride: int = 32  # l (for local: the window); also the width of the text/audio position grid
    c: int = 8  # fixed: summary cells per block
    num_verts: int = 1  # fixed: distinct per-head summary sub-blocks
    part: str = "both"  # both | local | stride | block | summary
    integration: str = "merged"  # merged | interleaved | multihead (paper §5.1, docs/method.md §4)
    position: str = "grid"  # grid: row/column of the width-l grid (text, audio); image: row/column/channel
    image_shape: list[int] = field(default_factory=list)  # [height, width, channels] for position="image"
    checkpoint: bool = False  # recompute attention and feed-forward in the backward pass
    backend: str = "auto"  # attention backend (see sparse_transformer.attention)
    ln_eps: float = 1e-5
    bias: bool = True  # biases in the blocks' linear layers (W_qkv, W_p, W_1, W_2)


@dataclass
class DataConfig:
    dir: str = ""  # a folder written by `sparse-transformer prepare`; "" = the embedded default
    seq_len: int = 256


@dataclass
class TrainConfig:
    """Defaults: the default run (about 3 minutes on 2 CPU cores: many small steps beat fewer large ones there)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    batch_size: int = 8  # sequences per step per process (before accumulation)
    grad_accum: int = 1
    max_steps: int = 3200
    max_minutes: float = 0.0  # > 0: also stop after this many minutes of training (schedule over the budget)
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.01  # decoupled (AdamW), matrices only
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 1000
    eval_batches: int = 10  # 0 = the whole validation split
    test_tokens: int = 0  # bytes of the test split scored at the end; 0 = all of it
    log_every: int = 20
    checkpoint_every: int = 1000
    seed: int = 1337
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp (under torchrun)
    progress: bool = True


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _coerce(section: str, key: str, value, typ):
    """Convert ``value`` (TOML value or CLI string) to the field type ``typ``, or raise UserError."""
    where = f"{section}.{key}"
    origin = typing.get_origin(typ)
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
    setattr(obj, key, _coerce(section, key, value, fields[key]))


def _apply_table(cfg: Config, table: dict, origin: str) -> None:
    for section, values in table.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise UserError(
                f"config {origin}: unknown section [{section}]; use {', '.join('[' + s + ']' for s in SECTIONS)}"
            )
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


def validate(cfg: Config) -> Config:
    """Check cross-field rules and sync ``model.n_ctx`` with ``data.seq_len``."""
    from . import patterns

    m = cfg.model
    m.n_ctx = cfg.data.seq_len
    if cfg.data.seq_len < 1:
        raise UserError(f"config: data.seq_len = {cfg.data.seq_len} must be positive")
    for key in ("n_layer", "d_model", "n_head"):
        if getattr(m, key) < 1:
            raise UserError(f"config: model.{key} = {getattr(m, key)} must be positive")
    if m.d_model % m.n_head:
        raise UserError(f"config: model.d_model = {m.d_model} is not divisible by model.n_head = {m.n_head}")
    d_qk = m.d_model * m.qk_ratio
    if d_qk != int(d_qk) or int(d_qk) % m.n_head or d_qk < m.n_head:
        raise UserError(
            f"config: model.qk_ratio = {m.qk_ratio} gives a query/key width {d_qk} not divisible by n_head = {m.n_head}; use 1.0 or 0.5"
        )
    if m.position not in ("grid", "image"):
        raise UserError(f"config: model.position = {m.position!r}; use grid (text, audio) or image")
    if m.position == "grid" and m.stride < 1:
        raise UserError(
            f"config: model.stride = {m.stride} must be positive (it is also the width of the position grid)"
        )
    if m.position == "image":
        if len(m.image_shape) != 3 or min(m.image_shape) < 1:
            raise UserError(
                f"config: model.image_shape = {m.image_shape} must be [height, width, channels], e.g. 32,32,3"
            )
        size = m.image_shape[0] * m.image_shape[1] * m.image_shape[2]
        if size != cfg.data.seq_len:
            raise UserError(
                f"config: data.seq_len = {cfg.data.seq_len} must equal one image ({'x'.join(map(str, m.image_shape))} = {size})"
            )
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"config: model.dropout = {m.dropout} must be in [0, 1)")
    try:
        patterns.from_name(m.pattern, m.stride, m.c, m.num_verts, m.part, m.integration)
    except ValueError as e:
        raise UserError(f"config: {e}") from None
    from .attention import BACKENDS

    if m.backend not in BACKENDS:
        raise UserError(f"config: model.backend = {m.backend!r}; choose one of {', '.join(BACKENDS)}")
    t = cfg.train
    if t.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"config: train.dtype = {t.dtype!r}; choose auto, bf16, fp16 or fp32")
    if t.parallel not in ("ddp", "fsdp"):
        raise UserError(f"config: train.parallel = {t.parallel!r}; choose ddp or fsdp")
    for key in ("batch_size", "grad_accum", "max_steps", "log_every"):
        if getattr(t, key) < 1:
            raise UserError(f"config: train.{key} = {getattr(t, key)} must be at least 1")
    for key in ("max_minutes", "test_tokens"):
        if getattr(t, key) < 0:
            raise UserError(f"config: train.{key} = {getattr(t, key)} must be 0 (off) or positive")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (``--section.key value``)."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config: {p} does not exist; pass a TOML file such as configs/enwik8.toml")
        try:
            table = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config: {p} is not valid TOML ({e}); fix the file") from None
        _apply_table(cfg, table, str(p))
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


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a run's config.json)."""
    cfg = Config()
    _apply_table(cfg, d, "config.json")
    return validate(cfg)
