"""Training: exact resume, the external check command, schedule, optimizer groups, run-dir safety."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, overrides
from safetensors.torch import load_file

from sparse_transformer import train as train_mod
from sparse_transformer.config import load_config
from sparse_transformer.errors import UserError
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import lr_at, make_optimizer, train


@pytest.fixture(scope="module")
def data_dir(text_data):
    """A small prepared text folder: 12,000 words of a fixed random vocabulary (conftest.py)."""
    return text_data("words", 12000)


def tiny(data_dir, *extra):
    settings = {
        "data.dir": data_dir,
        "model.dropout": 0.1,
        "train.dtype": "fp32",
        "train.warmup_steps": 3,
        "train.log_every": 1,
        "train.eval_every": 4,
        "train.eval_batches": 2,
    }
    return load_config(None, [*overrides(TINY_RUN, settings), *extra])


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in lines if "loss" in r]


def test_interrupted_then_resumed_equals_straight(data_dir, tmp_path, monkeypatch):
    cfg = tiny(data_dir, "--train.max_steps", "10", "--train.checkpoint_every", "4")
    straight = train(cfg, tmp_path / "straight")

    real_sample_batch = train_mod.sample_batch
    calls = []

    def crash_in_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # killed in step 7, after the step-4 checkpoint
        return real_sample_batch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "sample_batch", crash_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, "--train.max_steps", "10", "--train.checkpoint_every", "4"), tmp_path / "crashed")
    assert max(s for s, *_ in losses(tmp_path / "crashed")) == 6  # logged past its last checkpoint (step 4)
    monkeypatch.setattr(train_mod, "sample_batch", real_sample_batch)

    resumed = train(None, None, resume=tmp_path / "crashed")
    assert resumed["step"] == straight["step"] == 10
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")  # same values, no duplicated steps
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "crashed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_bits_per_dim"] == straight["test_bits_per_dim"]


def check_args(data_dir):
    """The 12-step run of the check-command tests (checkpoint at step 6), as CLI overrides."""
    model = {"model.n_layer": 2, "model.d_model": 64, "model.n_head": 2}
    run = {"data.seq_len": 256, "train.batch_size": 4, "train.max_steps": 12, "train.checkpoint_every": 6}
    return overrides({"data.dir": data_dir}, model, run, {"train.device": "cpu"})


def test_check_command_and_extend(data_dir, tmp_path, capsys):
    args = [*check_args(data_dir), "--train.progress", "false"]
    run = tmp_path / "run"
    summary = train(load_config(None, args), run)
    assert summary["step"] == 12 and summary["test_bits_per_dim"] < 8.0
    out = capsys.readouterr().out
    assert f"test bits per byte: {summary['test_bits_per_dim']:.3f}" in out
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.safetensors"):
        assert (run / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 12

    extended = train(None, run, resume=run, overrides=["--train.max_steps", "18"])
    assert extended["step"] == 18
    steps = [s for s, *_ in losses(run)]
    assert steps == sorted(steps) and steps[-1] == 18 and len(steps) == len(set(steps))
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 18
    with pytest.raises(UserError, match="already holds a run"):
        train(load_config(None, args), run)


def test_check_command_through_cli(data_dir, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "sparse_transformer", "train"]
    r = subprocess.run(
        base + ["--run-dir", str(run), *check_args(data_dir)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "test bits per byte:" in r.stdout
    r = subprocess.run(base + ["--resume", str(run), "--train.max_steps", "18"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert max(s for s, *_ in losses(run)) == 18


def test_resume_with_another_architecture_is_a_user_error(data_dir, tmp_path):
    train(tiny(data_dir, "--train.max_steps", "2"), tmp_path / "run")
    with pytest.raises(UserError, match="another architecture"):
        train(None, None, resume=tmp_path / "run", overrides=["--model.d_model", "64", "--train.max_steps", "4"])
    with pytest.raises(UserError, match="no checkpoint.pt"):
        train(None, None, resume=tmp_path / "nothing-here")


def test_only_a_finished_run_waits_for_every_rank_before_leaving_the_group(data_dir, tmp_path, monkeypatch):
    """train() asks parallel.shutdown for its barrier (every rank at the same point) only after a run
    that finished; after an error it leaves at once (a rank that failed alone would hang the others)."""
    asked = []
    monkeypatch.setattr(train_mod.parallel, "shutdown", lambda finished=False: asked.append(finished))
    train(tiny(data_dir, "--train.max_steps", "2"), tmp_path / "run")
    with pytest.raises(UserError, match="another architecture"):
        train(None, None, resume=tmp_path / "run", overrides=["--model.d_model", "64", "--train.max_steps", "4"])
    assert asked == [True, False]


def test_lr_schedule_warmup_then_cosine():
    t = load_config(
        None,
        ["--train.lr", "1.0", "--train.warmup_steps", "10", "--train.max_steps", "110", "--train.min_lr_ratio", "0.1"],
    ).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, t) == pytest.approx(0.1)
    values = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_weight_decay_on_matrices_only():
    cfg = load_config(
        None, ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.bias", "true"]
    )
    model = SparseTransformer(cfg.model)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.ff.fc.weight",
        "blocks.0.ff.proj.weight",
        "head.weight",
    }
    assert {"tok_emb.weight", "start", "pos_emb.tables.0", "blocks.0.ln_1.weight", "blocks.0.attn.qkv.bias"} <= plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))


@pytest.mark.slow
def test_default_run_reaches_its_target(tmp_path):
    """The README's main job, as a user runs it: `sparse-transformer train` with no arguments on the
    embedded Wikipedia sample (fresh cache: data preparation included) must reach the issue's target
    of 2.5 test bits per byte (gzip -9: 2.841, bzip2 -9: 2.37 on the same bytes, docs/results.md).
    Deterministic seeds make this a fixed number up to the CPU's rounding (2.444 on 2026-11-30, one
    thread); no timing is asserted here (README and docs/results.md have the times)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ,
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    r = subprocess.run(
        [sys.executable, "-m", "sparse_transformer", "train", "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("test bits per byte:"))
    assert float(line.split(":")[1].split()[0]) <= 2.5  # "test bits per byte: 2.444 (304,488 bytes); time: ..."
    assert "sample:" in r.stdout


def test_lr_schedule_follows_the_time_budget():
    t = load_config(
        None,
        ["--train.lr", "1.0", "--train.warmup_steps", "10", "--train.max_steps", "1000000", "--train.max_minutes", "1"],
    ).train
    assert lr_at(5, t, time_progress=0.9) == pytest.approx(0.6)  # warmup is by steps
    assert lr_at(20, t, time_progress=0.0) == pytest.approx(1.0, abs=1e-4)
    assert lr_at(20, t, time_progress=0.5) == pytest.approx(0.5)
    assert lr_at(20, t, time_progress=1.0) == pytest.approx(0.0)
    # whichever of steps and time is further along decides
    t2 = load_config(None, ["--train.lr", "1.0", "--train.warmup_steps", "0", "--train.max_steps", "100"]).train
    assert lr_at(50, t2, time_progress=0.1) == pytest.approx(0.5)


def test_time_budget_ends_the_run_and_reports_the_clocks(data_dir, tmp_path):
    summary = train(
        tiny(
            data_dir,
            "--train.max_steps",
            "100000",
            "--train.max_minutes",
            "0.1",
            "--train.warmup_steps",
            "0",
            "--train.test_tokens",
            "256",
        ),
        tmp_path / "run",
    )
    assert 2 < summary["step"] < 100000
    assert 6.0 <= summary["train_s"] < 6.0 + 5.0  # stops at the first step boundary after 6 s of training
    assert summary["test_tokens"] == 256
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_s = [r["train_s"] for r in records if "loss" in r]
    assert train_s == sorted(train_s) and train_s[-1] == pytest.approx(summary["train_s"], abs=1e-3)
    last_lr = [r["lr"] for r in records if "lr" in r][-1]
    assert last_lr < 0.5 * load_config(None).train.lr  # the last step ran in the second half of the cosine
    assert {"train_s", "eval_s", "compile_s", "test_s"} <= set(records[-1])


def test_blocks_without_biases(data_dir):
    cfg = tiny(data_dir, "--model.bias", "false")
    names = [n for n, _ in SparseTransformer(cfg.model).named_parameters()]
    assert not [n for n in names if n.startswith("blocks.") and n.endswith(".bias") and ".ln_" not in n]
    assert "blocks.0.ln_1.bias" in names and "blocks.0.attn.qkv.weight" in names
