"""Config: presets, dotted overrides, and one clear error per bad value."""

from pathlib import Path

import pytest

from sparse_transformer import patterns as P
from sparse_transformer.config import (
    Config,
    DataConfig,
    ModelConfig,
    Precision,
    TrainConfig,
    choices,
    config_from_dict,
    literal_values,
    load_config,
    preset_names,
    validate,
)
from sparse_transformer.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "sparse_transformer" / "configs"


def test_presets_and_overrides():
    cfg = load_config(CONFIGS / "enwik8.toml", ["--model.n_layer", "2", "--train.device=cpu", "--data.seq_len", "256"])
    assert cfg.model.n_layer == 2 and cfg.train.device == "cpu"
    assert cfg.model.n_ctx == 256 == cfg.data.seq_len
    assert cfg.model.pattern == "fixed" and cfg.model.c == 32
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.n_layers", "2"], "unknown key 'model.n_layers'"),
        (["--optim.lr", "1"], "unknown key 'optim.lr'"),
        (["--model.n_layer", "two"], "model.n_layer = 'two' is not a valid int"),
        (["--model.checkpoint", "maybe"], "not a valid bool"),
        (["--model.d_model", "100", "--model.n_head", "3"], "not divisible by model.n_head"),
        (["--model.pattern", "fixed", "--model.c", "64", "--model.stride", "32"], "c=64 is larger than stride=32"),
        (["--model.position", "image", "--model.image_shape", "4,4,3"], "must equal one image"),
        (["--train.dtype", "fp8"], "train.dtype"),
        (["--model.backend", "cuda"], "model.backend"),
        (["--train.max_steps"], "needs a value"),
        (["positional"], "unrecognized argument"),
    ],
)
def test_bad_values(args, message):
    with pytest.raises(UserError, match=message):
        load_config(None, args)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="neither a TOML file nor a preset.*enwik8"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optimizer]\nlr = 1.0\n")
    with pytest.raises(UserError, match=r"unknown section \[optimizer\]"):
        load_config(unknown)


def test_n_ctx_is_derived_from_seq_len():
    import copy

    cfg = load_config(None, ["--data.seq_len", "96"])
    assert cfg.model.n_ctx == 96
    before = copy.deepcopy(cfg)
    assert validate(cfg) == before  # validate only checks
    assert Config(data=DataConfig(seq_len=40)).model.n_ctx == 40
    with pytest.raises(UserError, match="model.n_ctx is derived from data.seq_len"):
        load_config(None, ["--model.n_ctx", "96"])
    table = cfg.to_dict()
    assert config_from_dict(table) == cfg  # config.json records n_ctx; reading it re-derives it
    table["model"]["n_ctx"] = 128
    with pytest.raises(UserError, match="differs from data.seq_len"):
        config_from_dict(table)
    cfg.data.seq_len = 64  # bypassing set_value: validate says so instead of changing n_ctx
    with pytest.raises(UserError, match="n_ctx is derived"):
        validate(cfg)


def test_literal_fields_drive_validation_and_cli_choices():
    from sparse_transformer.attention import BACKENDS
    from sparse_transformer.cli import build_parser
    from sparse_transformer.runtime import DTYPES

    assert choices(ModelConfig, "pattern") == P.PATTERN_NAMES
    assert choices(ModelConfig, "integration") == tuple(P.INTEGRATIONS)
    assert BACKENDS == choices(ModelConfig, "backend")
    assert tuple(DTYPES) == literal_values(Precision) and choices(TrainConfig, "dtype") == ("auto", *DTYPES)
    layout = build_parser()._subparsers._group_actions[0].choices["layout"]
    offered = {a.dest: a.choices for a in layout._actions if a.choices}
    assert offered == {k: choices(ModelConfig, k) for k in ("pattern", "part", "integration")}
    with pytest.raises(UserError, match=r"model.part = 'middle'; choose one of both, local, stride, block, summary"):
        load_config(None, ["--model.part", "middle"])
    with pytest.raises(UserError, match="train.parallel = 'zero'"):
        validate(Config(train=TrainConfig(parallel="zero")))  # built in code: validate checks the types too
    with pytest.raises(UserError, match="train.device = 'gpu'"):
        load_config(None, ["--train.device", "gpu"])
    assert load_config(None, ["--train.device", "cuda:1"]).train.device == "cuda:1"


def test_runtime_resolves_names():
    import torch

    from sparse_transformer.runtime import dtype_name, resolve_device, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    assert dtype_name("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_device("cpu") == cpu and resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(UserError, match="--device 'tpu' is not a device"):
        resolve_device("tpu", option="--device")
    with pytest.raises(UserError, match="choose auto, bf16, fp16, fp32"):
        resolve_dtype("fp8", cpu)


def test_presets_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the presets come from the package
    assert preset_names() == ["audio", "cifar10", "enwik8", "imagenet64"]
    by_name = load_config("enwik8")
    assert by_name == load_config(CONFIGS / "enwik8.toml") == load_config("enwik8.toml")
    assert load_config("configs/enwik8.toml") == by_name  # the repository path of older commands
    assert load_config("cifar10").model.image_shape == [32, 32, 3]
    with pytest.raises(UserError, match="presets audio, cifar10, enwik8, imagenet64"):
        load_config("enwik9")
    with pytest.raises(UserError, match="neither a TOML file nor a preset"):
        load_config("elsewhere/enwik8.toml")  # only a bare name (or configs/NAME) means a preset
    own = tmp_path / "enwik8.toml"
    own.write_text("[model]\nn_layer = 5\n")
    assert load_config("enwik8.toml").model.n_layer == 5  # an existing file wins over the preset of that name


def test_a_toml_file_that_starts_with_a_byte_order_mark_loads(tmp_path):
    """Windows editors write a UTF-8 BOM; tomllib calls it an invalid statement at line 1."""
    (tmp_path / "c.toml").write_bytes("\ufeff[train]\nlr = 0.001\n".encode())
    assert load_config(tmp_path / "c.toml").train.lr == 0.001
