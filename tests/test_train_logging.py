"""What a run reports and where: units per modality, TFLOP/s in metrics, progress of the test
evaluation, optional W&B, and a config fitted to its data before anything is written."""

import json
import sys
import types

import numpy as np
import pytest
from conftest import SMALLEST_MODEL, overrides, write_prepared

from sparse_transformer.cli import main
from sparse_transformer.config import load_config
from sparse_transformer.data.format import SPLITS
from sparse_transformer.errors import UserError
from sparse_transformer.train import fit_to_data, train


@pytest.fixture(scope="module")
def text_dir(text_data):
    return text_data("letters", 20000)  # 20,000 random lowercase letters (conftest.py)


def image_dir(root, shape=(4, 4, 3), n=(40, 4, 4)):
    """A prepared image folder written by hand: ``n`` images of ``shape`` per split."""
    record = shape[0] * shape[1] * shape[2]
    rng = np.random.default_rng(1)
    splits = {split: rng.integers(0, 256, count * record).astype(np.uint8).tobytes() for split, count in zip(SPLITS, n)}
    return write_prepared(root, splits, "image", kind="mnist", record_len=record, shape=list(shape))


def tiny(data_dir, *extra):
    run = {"train.batch_size": 2, "train.max_steps": 3, "train.warmup_steps": 1, "train.log_every": 1}
    evals = {"train.eval_every": 0, "train.eval_batches": 1}
    cpu = {"train.device": "cpu", "train.dtype": "fp32"}
    return [*overrides({"data.dir": data_dir}, SMALLEST_MODEL, run, evals, cpu), *extra]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_text_run_reports_bits_per_byte_tflops_and_test_progress(text_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(text_dir.parent)  # a relative data.dir is stored as an absolute path
    cfg = load_config(None, tiny(text_dir.name, "--data.seq_len", "32", "--train.test_tokens", "200"))
    summary = train(cfg, tmp_path / "run")
    captured = capsys.readouterr()
    assert "test bits per byte:" in captured.out and summary["unit"] == "bits per byte"
    assert "scoring 200 bytes of the test split" in captured.out + captured.err
    assert "eval" in captured.err  # the test evaluation's progress bar
    recs = records(tmp_path / "run")
    train_recs = [r for r in recs if "loss" in r]
    assert train_recs and all(r["tflops"] > 0 and "mfu" not in r for r in train_recs)  # no MFU on CPU
    test = next(r for r in recs if "test_bits_per_dim" in r)
    assert test["unit"] == "bits per byte" and test["test_tokens"] == 200
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dir"] == str(text_dir.resolve())

    assert main(["eval", "--run", str(tmp_path / "run"), "--max-tokens", "100", "--no-progress"]) == 0
    assert "bits per byte over 100 bytes" in capsys.readouterr().out
    assert main(["eval", "--run", str(tmp_path / "run"), "--max-tokens", "0"]) == 2
    assert "--max-tokens 0 must be positive" in capsys.readouterr().err


def test_eval_data_points_a_run_at_moved_data(text_dir, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(text_dir, tmp_path / "data")
    train(
        load_config(
            None,
            tiny(tmp_path / "data", "--data.seq_len", "32", "--train.test_tokens", "64", "--train.progress", "false"),
        ),
        tmp_path / "run",
    )
    (tmp_path / "data").rename(moved)
    assert main(["eval", "--run", str(tmp_path / "run"), "--max-tokens", "64", "--no-progress"]) == 2
    assert "meta.json is missing" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--run",
                str(tmp_path / "run"),
                "--data",
                str(moved),
                "--max-tokens",
                "64",
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["data_dir"] == str(moved) and result["tokens"] == 64 and result["unit"] == "bits per byte"


def test_image_data_gets_image_positions_and_bits_per_dim(tmp_path, capsys):
    data = image_dir(tmp_path / "images")
    summary = train(
        load_config(None, tiny(data, "--data.seq_len", "48", "--train.progress", "false")), tmp_path / "run"
    )
    out = capsys.readouterr().out
    assert "row, column and channel position embeddings for 4x4x3 images" in out
    assert "test bits per dim:" in out and summary["unit"] == "bits per dim"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["position"] == "image" and saved["image_shape"] == [4, 4, 3]
    assert main(["eval", "--run", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "bits per dim over 192 dims" in capsys.readouterr().out


def test_sequence_length_that_does_not_fit_is_refused_before_writing(tmp_path, text_dir):
    data = image_dir(tmp_path / "images")
    with pytest.raises(UserError, match="data.seq_len = 40 does not fit .* use --data.seq_len 48"):
        train(load_config(None, tiny(data, "--data.seq_len", "40")), tmp_path / "run")
    with pytest.raises(UserError, match=r"model.image_shape = \[2, 8, 3\] but the data holds \[4, 4, 3\]"):
        train(
            load_config(
                None, tiny(data, "--data.seq_len", "48", "--model.position", "image", "--model.image_shape", "2,8,3")
            ),
            tmp_path / "run",
        )
    with pytest.raises(UserError, match="longer than the training split"):
        train(load_config(None, tiny(text_dir, "--data.seq_len", "100000")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fit_to_data_warns_about_a_warmup_longer_than_the_run(text_dir):
    from sparse_transformer.data.loader import read_meta

    cfg = load_config(None, tiny(text_dir, "--train.warmup_steps", "5", "--train.max_steps", "5"))
    notes = fit_to_data(cfg, read_meta(text_dir))
    assert len(notes) == 1 and "train.warmup_steps = 5 is not shorter than train.max_steps = 5" in notes[0]
    assert fit_to_data(load_config(None, tiny(text_dir)), read_meta(text_dir)) == []


def test_wandb_is_optional(text_dir, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = tiny(text_dir, "--data.seq_len", "32", "--train.test_tokens", "64", "--train.progress", "false")
    train(load_config(None, args), tmp_path / "off")
    assert calls == []  # off by default: never initialized
    train(load_config(None, [*args, "--train.wandb", "my-project"]), tmp_path / "on")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "my-project" and calls[0][1]["name"] == "on"
    assert calls[0][1]["config"]["train"]["wandb"] == "my-project"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2, 3, 3, 3]  # train records, then validation and test at the end
    assert "train/loss" in logged[0][2] and "train/tflops" in logged[0][2] and "val/val_bits_per_dim" in logged[3][2]
    assert "test/test_bits_per_dim" in logged[-1][2] and calls[-1] == ("finish",)

    monkeypatch.setitem(sys.modules, "wandb", None)  # requested but not installed: refused before writing
    with pytest.raises(UserError, match="--train.wandb needs the wandb package; pip install wandb"):
        train(load_config(None, [*args, "--train.wandb", "my-project"]), tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_an_export_samples_and_evaluates_from_anywhere(tmp_path, capsys, monkeypatch):
    import shutil

    data = image_dir(tmp_path / "images")
    train(load_config(None, tiny(data, "--data.seq_len", "48", "--train.progress", "false")), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["modality"] == "image" and saved["shape"] == [4, 4, 3] and saved["sample_rate"] == 0
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "run" / name, export / name)
    moved = tmp_path / "moved-images"
    data.rename(moved)  # the export alone: no data where the run's config points
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["sample", "--run", str(export), "--num", "2", "--out", "out"]) == 0
    written = capsys.readouterr().out.split()
    assert any(p.endswith(".png") for p in written) and (elsewhere / "out").is_dir()
    assert main(["eval", "--run", str(export), "--data", str(moved), "--no-progress"]) == 0
    assert "bits per dim over 192 dims" in capsys.readouterr().out
