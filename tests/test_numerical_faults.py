"""Numerical faults: a non-finite loss or gradient skips the step (counted in metrics), K skipped steps
in a row end the run with exit status 2 naming the last good checkpoint, non-finite weights are never
saved, the newest K checkpoints are kept and --resume takes the newest one that loads."""

import json
import math
import os

import pytest
import torch
from conftest import FAULT_RUN, overrides
from safetensors.torch import load_file

from sparse_transformer import checkpoint, parallel
from sparse_transformer import train as train_mod
from sparse_transformer.cli import main
from sparse_transformer.config import load_config
from sparse_transformer.errors import UserError
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import setup_training, train, train_step


@pytest.fixture(scope="module")
def data_dir(text_data):
    return text_data("words", 12000)  # conftest.py


def tiny_args(data_dir, *extra):
    return [*overrides({"data.dir": data_dir}, FAULT_RUN, {"train.dtype": "fp32", "train.warmup_steps": 2}), *extra]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def finite_checkpoint(path):
    state = checkpoint.load(path)
    return all(torch.isfinite(v).all() for v in state["model"].values())


def nan_at(monkeypatch, *steps):
    """Make the training loss NaN at these steps (1-based; one micro-batch per step)."""
    real = train_mod.cross_entropy
    calls = []

    def cross_entropy(logits, x):
        calls.append(1)
        loss = real(logits, x)
        return loss * math.nan if len(calls) in steps else loss

    monkeypatch.setattr(train_mod, "cross_entropy", cross_entropy)


@pytest.mark.parametrize(("dtype", "recompute"), [("fp32", "false"), ("fp16", "false"), ("fp32", "true")])
def test_skipped_step_changes_no_weight_or_optimizer_state(data_dir, monkeypatch, dtype, recompute):
    cfg = load_config(None, tiny_args(data_dir, "--model.checkpoint", recompute))  # activation checkpointing
    torch.manual_seed(0)
    model = SparseTransformer(cfg.model)
    dt = torch.float16 if dtype == "fp16" else torch.float32
    train_model, optimizer, scaler = setup_training(model, cfg, parallel.Dist(), dt)
    x = torch.randint(0, 256, (4, 64))
    loss, norm, skipped, stop = train_step(train_model, optimizer, scaler, lambda: x, cfg.train, dt, 1e-3)
    assert not skipped and stop == 0 and math.isfinite(loss.item()) and math.isfinite(norm.item())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = optimizer.state_dict()
    opt_before = {i: {k: v.clone() for k, v in s.items()} for i, s in opt_before["state"].items()}
    scale = scaler.get_scale() if scaler.is_enabled() else None
    nan_at(monkeypatch, 1)
    loss, norm, skipped, stop = train_step(train_model, optimizer, scaler, lambda: x, cfg.train, dt, 1e-3)
    assert skipped and stop == 0 and math.isnan(loss.item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(opt_before[i][k], after[i][k]) for i in opt_before for k in opt_before[i])
    assert all(p.grad is None for p in model.parameters())
    if scaler.is_enabled():
        assert scaler.get_scale() == scale / 2  # the grad scaler backs off as for its own overflows


def test_nan_steps_are_skipped_and_counted(data_dir, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, 3, 5, 6)  # log records every 2 steps: (1, 2), (3, 4), (5, 6), (7, 8)
    run = tmp_path / "run"
    summary = train(load_config(None, tiny_args(data_dir, "--train.max_steps", "8", "--train.log_every", "2")), run)
    assert summary["step"] == 8 and summary["skipped_steps"] == 3
    assert math.isfinite(summary["test_bits_per_dim"])
    train_recs = [r for r in records(run) if "lr" in r]
    assert [(r["step"], r["skipped_steps"], r["skipped_steps_total"]) for r in train_recs] == [
        (2, 0, 0),
        (4, 1, 1),
        (6, 2, 3),
        (8, 0, 3),
    ]
    assert train_recs[2]["loss"] is None and train_recs[2]["grad_norm"] is None  # steps 5 and 6: nothing to average
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(train_recs) if i != 2)  # the steps not skipped
    state = checkpoint.load(run / "checkpoint.pt")
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}  # 8 steps, 3 skipped
    assert state["skips"] == {"total": 3, "in_a_row": 0, "since_log": 0}
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient norm; step skipped (1 in a row)" in out
    assert "step 6: non-finite loss or gradient norm; step skipped (2 in a row)" in out
    assert "note: 3 of 8 steps were skipped" in out


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_divergence_stops_with_exit_2_and_keeps_the_finite_checkpoint(data_dir, tmp_path, capsys, dtype):
    """--train.lr 1e6: every step from the second or third on is NaN. The run stops after
    train.max_bad_steps of them with one line naming the last good checkpoint; no NaN weights are
    saved and nothing is exported."""
    run = tmp_path / "run"
    args = ["--train.max_steps", "40", "--train.checkpoint_every", "1", "--train.keep_checkpoints", "3"]
    code = main(
        ["train", "--run-dir", str(run), *tiny_args(data_dir, *args, "--train.lr", "1e6", "--train.dtype", dtype)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    last = [r for r in records(run) if "lr" in r][-1]
    stop = last["step"]
    assert last["skipped_steps_total"] == 8 and last["loss"] is None  # the default train.max_bad_steps
    good = stop - 8  # the last step that was not skipped
    assert err[0] == (
        f"error: train: stopped at step {stop}: the last 8 steps had a non-finite loss or gradient norm "
        f"(train.max_bad_steps); the last good checkpoint is {run / f'checkpoint-{good}.pt'} (step {good}); continue "
        f"from it with a lower learning rate: sparse-transformer train --resume {run} --train.lr 100000"
    )
    saved = sorted(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pt"))
    assert saved == list(range(1, good + 1))[-3:]  # no checkpoints of skipped steps; the newest 3 kept
    assert all(finite_checkpoint(p) for p in run.glob("checkpoint*.pt"))
    assert os.path.samefile(run / "checkpoint.pt", run / f"checkpoint-{good}.pt")
    assert not (run / "model.safetensors").exists()


def test_nonfinite_weights_are_never_saved(data_dir, tmp_path, monkeypatch):
    """A step with a finite loss and gradient that leaves an infinite weight (here: forced after the
    update of step 4, a checkpoint step): the save is refused and the run ends naming the previous
    checkpoint, which stays as it was."""
    real_step = train_mod.train_step
    calls = []

    def poisoned(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                next(model.parameters())[0] = math.inf
        return out

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    run = tmp_path / "run"
    cfg = load_config(None, tiny_args(data_dir, "--train.max_steps", "8", "--train.checkpoint_every", "2"))
    with pytest.raises(UserError) as e:
        train(cfg, run)
    assert str(e.value) == (
        f"train: stopped at step 4: the weights are not finite, so they were not saved; the last good checkpoint "
        f"is {run / 'checkpoint-2.pt'} (step 2); continue from it with a lower learning rate: "
        f"sparse-transformer train --resume {run} --train.lr 0.0002"
    )
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2.pt", "checkpoint.pt"]
    assert finite_checkpoint(run / "checkpoint.pt") and checkpoint.load(run / "checkpoint.pt")["step"] == 2
    with pytest.raises(checkpoint.NotFinite):
        model = SparseTransformer(cfg.model)
        with torch.no_grad():
            model.head.weight[0, 0] = math.nan
        checkpoint.save_training(tmp_path / "other", model, torch.optim.AdamW(model.parameters()), {"step": 1})
    assert not (tmp_path / "other").exists()


def test_keeps_the_newest_checkpoints_and_resumes_from_the_newest_that_loads(data_dir, tmp_path, capsys):
    args = tiny_args(
        data_dir, "--train.max_steps", "10", "--train.checkpoint_every", "2", "--train.keep_checkpoints", "3"
    )
    run = tmp_path / "run"
    train(load_config(None, args), run)
    assert sorted(p.name for p in run.glob("checkpoint*")) == [
        "checkpoint-10.pt",
        "checkpoint-6.pt",
        "checkpoint-8.pt",
        "checkpoint.pt",
    ]
    assert os.path.samefile(run / "checkpoint.pt", run / "checkpoint-10.pt")
    assert [checkpoint.load(p)["step"] for p in checkpoint.training_checkpoints(run)] == [10, 8, 6]

    # The newest is damaged (checkpoint.pt is the same file): resume passes over it to step 8 and
    # trains steps 9 and 10 again, to the same result.
    data = (run / "checkpoint-10.pt").read_bytes()
    (run / "checkpoint-10.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    train(None, None, resume=run)
    out = capsys.readouterr().out
    assert "warning: passed over a checkpoint that does not load: checkpoint: " in out
    assert f"resumed {run} at step 8 of 10 from {run / 'checkpoint-8.pt'}" in out
    train(load_config(None, args), tmp_path / "straight")
    a, b = load_file(run / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load(run / "checkpoint.pt")["step"] == 10 and finite_checkpoint(run / "checkpoint-10.pt")

    # keep 1: only the newest, under both names
    train(None, None, resume=run, overrides=["--train.max_steps", "12", "--train.keep_checkpoints", "1"])
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint-12.pt", "checkpoint.pt"]


def test_fault_keys_are_checked():
    for key in ("keep_checkpoints", "max_bad_steps"):
        with pytest.raises(UserError, match=f"train.{key} = 0 must be >= 1"):
            load_config(None, [f"--train.{key}", "0"])
    t = load_config(None).train
    assert (t.keep_checkpoints, t.max_bad_steps) == (2, 8)
