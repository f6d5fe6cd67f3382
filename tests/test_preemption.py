"""Preemption: SIGTERM / SIGINT save a checkpoint at the next step boundary, say so in one line, exit
with 128 + the signal's number, and --resume then equals the uninterrupted run bit for bit."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAULT_RUN, overrides
from safetensors.torch import load_file

from sparse_transformer import checkpoint
from sparse_transformer import train as train_mod
from sparse_transformer.config import load_config
from sparse_transformer.train import Stopped, train


@pytest.fixture(scope="module")
def data_dir(text_data):
    return text_data("words", 12000)  # conftest.py


def tiny_args(data_dir, *extra):
    """A tiny CPU run with a constant learning rate after warm-up (``min_lr_ratio`` 1), so that the
    schedule does not depend on ``max_steps``: a run stopped at any step can be resumed to a shorter
    end and compared with an uninterrupted run of that length."""
    constant = {"train.warmup_steps": 2, "train.min_lr_ratio": 1}
    return [
        *overrides({"data.dir": data_dir}, FAULT_RUN, {"model.dropout": 0.1, "train.dtype": "fp32"}, constant),
        *extra,
    ]


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]


def assert_same_run(a, b):
    assert losses(a) == losses(b)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for_step(run, step, proc, timeout=120.0):
    """Poll metrics.jsonl until it records ``step`` (the process is training), or fail."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the training process ended before it was signalled"
        path = run / "metrics.jsonl"
        if path.is_file() and any(
            json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines() if line.endswith("}")
        ):
            return
        time.sleep(0.02)
    pytest.fail(f"no step {step} in {run / 'metrics.jsonl'} after {timeout} s")


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@pytest.fixture(scope="module")
def signalled(data_dir, tmp_path_factory):
    """One training process per signal, started together (their start-up, a fresh interpreter
    importing torch, overlaps), each sent its signal once it has logged step 3:
    ``{signal: (folder, run folder, exit status)}``, stdout and stderr in the folder's ``out`` and ``err``."""
    args = tiny_args(data_dir, "--train.checkpoint_every", "0")  # checkpoints only at the end (or a stop)
    procs = {}
    try:
        for sig in SIGNALS.values():
            folder = tmp_path_factory.mktemp(signal.Signals(sig).name)
            cmd = [sys.executable, "-m", "sparse_transformer", "train", "--run-dir", str(folder / "run")]
            with open(folder / "out", "w") as out, open(folder / "err", "w") as err:
                proc = subprocess.Popen([*cmd, *args, "--train.max_steps", "100000"], stdout=out, stderr=err)
            procs[sig] = folder, proc
        for sig, (folder, proc) in procs.items():
            wait_for_step(folder / "run", 3, proc)
            proc.send_signal(sig)
        return {sig: (folder, folder / "run", proc.wait(timeout=120)) for sig, (folder, proc) in procs.items()}
    finally:
        for _, proc in procs.values():
            proc.kill()


@pytest.mark.parametrize("sig", list(SIGNALS.values()), ids=list(SIGNALS))
def test_signal_saves_a_checkpoint_and_resume_is_exact(data_dir, signalled, sig):
    tmp_path, run, code = signalled[sig]
    stderr = (tmp_path / "err").read_text()
    assert code == 128 + sig, stderr
    name = signal.Signals(sig).name
    m = re.search(rf"stopped by {name} at step (\d+); checkpoint saved to (\S+); resume with: (.*)$", stderr, re.M)
    assert m, stderr
    stop = int(m.group(1))
    assert 3 <= stop < 100000 and "Traceback" not in stderr
    assert m.group(2) == str(run / f"checkpoint-{stop}.pt")
    assert m.group(3) == f"sparse-transformer train --resume {run}"
    assert os.path.samefile(run / f"checkpoint-{stop}.pt", run / "checkpoint.pt")
    assert checkpoint.load(run / "checkpoint.pt")["step"] == stop
    assert max(s for s, *_ in losses(run)) == stop  # logged up to the step it stopped at, no further
    assert not (run / "model.safetensors").exists()  # not finished: nothing exported

    end = stop + 3
    resumed = train(None, None, resume=run, overrides=["--train.max_steps", str(end)])
    straight = train(load_config(None, tiny_args(data_dir, "--train.max_steps", str(end))), tmp_path / "straight")
    assert resumed["step"] == straight["step"] == end
    assert_same_run(run, tmp_path / "straight")
    assert resumed["test_bits_per_dim"] == straight["test_bits_per_dim"]


def test_second_signal_while_saving_changes_nothing(data_dir, tmp_path, monkeypatch):
    """SIGTERM during step 3, then SIGINT in the middle of writing that step's checkpoint: the run
    stops at step 3 by SIGTERM with an intact checkpoint, which resumes exactly."""
    real_sample, real_save = train_mod.sample_batch, checkpoint.save
    draws = []

    def signal_in_step_3(*args, **kwargs):
        draws.append(1)
        if len(draws) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*args, **kwargs)

    def signal_while_saving(run_dir, state, name=checkpoint.CHECKPOINT):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, in the middle of the save
        return real_save(run_dir, state, name)

    monkeypatch.setattr(train_mod, "sample_batch", signal_in_step_3)
    monkeypatch.setattr(checkpoint, "save", signal_while_saving)
    run = tmp_path / "run"
    with pytest.raises(Stopped) as e:
        train(load_config(None, tiny_args(data_dir, "--train.max_steps", "6")), run)
    assert e.value.signum == signal.SIGTERM and e.value.exit_status == 143
    assert str(e.value).startswith("stopped by SIGTERM at step 3;")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    assert sorted(p.name for p in run.glob("*checkpoint*")) == ["checkpoint-3.pt", "checkpoint.pt"]  # no temp files
    monkeypatch.undo()

    train(None, None, resume=run)
    train(load_config(None, tiny_args(data_dir, "--train.max_steps", "6")), tmp_path / "straight")
    assert_same_run(run, tmp_path / "straight")
