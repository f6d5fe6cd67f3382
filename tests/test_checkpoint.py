"""Checkpoints: atomic saves survive a crash, safe loading, architecture mismatches, export round trip."""

import json
import os
import pickle

import pytest
import torch

from sparse_transformer import checkpoint
from sparse_transformer.config import load_config
from sparse_transformer.errors import UserError
from sparse_transformer.model import SparseTransformer


def small_cfg(d_model=32):
    return load_config(
        None,
        [
            "--model.n_layer",
            "1",
            "--model.d_model",
            str(d_model),
            "--model.n_head",
            "2",
            "--data.seq_len",
            "64",
            "--model.stride",
            "16",
            "--model.c",
            "4",
        ],
    )


def test_save_load_round_trip(tmp_path):
    state = {"step": 3, "w": torch.arange(4.0), "rng": {"numpy": {"state": 2**100 + 7}}, "xs": [1, 2]}
    path = checkpoint.save(tmp_path, state)
    loaded = checkpoint.load(path)
    assert (
        loaded["step"] == 3 and torch.equal(loaded["w"], state["w"]) and loaded["rng"]["numpy"]["state"] == 2**100 + 7
    )
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary files left


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1, "w": torch.ones(1000)})
    real_save = torch.save

    def half_written(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # the disk fills up / the process dies mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]

    def crash_before_rename(src, dst):  # temp file complete, killed before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, {"step": 3, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 1


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


def test_tampered_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": RunsCode(str(marker))}, path)
    with pytest.raises(UserError, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(RunsCode(str(marker)), protocol=2))
    with pytest.raises(UserError):
        checkpoint.load(raw)
    assert not marker.exists()


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
    checkpoint.save(tmp_path, {"w": torch.ones(10000)})
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load(tmp_path / "checkpoint.pt")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError):
        checkpoint.load_model(tmp_path)  # no config.json
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_model(tmp_path / "no-run")


def test_export_and_load_model_round_trip(tmp_path):
    cfg = small_cfg()
    torch.manual_seed(0)
    model = SparseTransformer(cfg.model)
    torch.nn.init.normal_(model.head.weight)  # W_out starts at zero; make the output depend on it
    checkpoint.export(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 32
    loaded, loaded_cfg = checkpoint.load_model(tmp_path)
    x = torch.randint(0, 256, (2, 64))
    model.eval()
    assert torch.equal(loaded(x), model(x)) and loaded_cfg == cfg and not loaded.training


def test_checkpoint_of_another_architecture_is_a_user_error(tmp_path):
    big = small_cfg(d_model=64)
    checkpoint.save(tmp_path, {"model": SparseTransformer(big.model).state_dict()})
    checkpoint.save_config(tmp_path, small_cfg(d_model=32))
    with pytest.raises(UserError, match=r"another architecture: .* has shape \[.*64\] there but \[.*32\]"):
        checkpoint.load_model(tmp_path)
    state = SparseTransformer(small_cfg().model).state_dict()
    state.pop("head.weight")
    with pytest.raises(UserError, match="lacks head.weight"):
        checkpoint.check_compatible(SparseTransformer(small_cfg().model), state, "x.pt")
