"""Config: presets, dotted overrides, and one clear error per bad value."""

from pathlib import Path

import pytest

from sparse_transformer.config import config_from_dict, load_config, preset_names
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
