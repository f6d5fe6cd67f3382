"""Run folders under faults (issue 10, items 2, 5 and 6): a refused command writes nothing, one writer
per run folder (a lock that a dead process's leftover does not block), logs that survive a kill."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import check_args, losses, tiny

from sparse_transformer import checkpoint
from sparse_transformer.errors import UserError
from sparse_transformer.runfolder import LOCK, TEMPORARY, RunLock, remove_temporary_files, temporary_name, trim_log
from sparse_transformer.train import train


@pytest.fixture(scope="module")
def data_dir(text_data):
    return text_data("words", 12000)  # the data of tests/test_train.py


def snapshot(folder):
    """Every file and folder under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.is_file() and p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_a_refused_command_leaves_every_file_as_it_was(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_dir, "--train.max_steps", "2"), run)
    before = snapshot(run)
    for overrides, match in [
        (["--model.d_model", "64"], "another architecture"),  # found only when the checkpoint is loaded
        (["--data.seq_len", "100000"], "longer than the training split"),
        (["--train.max_steps", "1"], "at step 2, past --train.max_steps 1"),
        (["--model.pattern", "nope"], "choose one of"),
        (["--data.dir", str(tmp_path / "nowhere")], "nowhere"),
    ]:
        with pytest.raises(UserError, match=match):
            train(None, None, resume=run, overrides=overrides)
        assert snapshot(run) == before, overrides
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny(data_dir, "--model.d_model", "64"), run)
    assert snapshot(run) == before
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    for name in ("metrics.jsonl", LOCK):  # links out of a run folder someone sent: never written through
        moved = run.parent / f"{name}.real"
        if (run / name).exists():
            (run / name).rename(moved)
        (run / name).symlink_to(outside)
        with pytest.raises(UserError, match="leads out of the run folder|lock file is a symbolic link"):
            train(None, None, resume=run)
        assert outside.read_text() == "keep me"
        (run / name).unlink()
        if moved.exists():
            moved.rename(run / name)
    assert snapshot(run) == before
    newest = checkpoint.training_checkpoints(run)[0]  # checkpoint-2.pt: what a resume reads
    state = checkpoint.load(newest)
    state["ranks"][0]["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)  # tampered: found only when used
    checkpoint.save(run, state, newest.name)
    before = snapshot(run)
    with pytest.raises(UserError, match="random state that cannot be restored"):
        train(None, None, resume=run)
    assert snapshot(run) == before
    with pytest.raises(UserError, match="longer than the training split"):  # a new folder is not left behind
        train(tiny(data_dir, "--data.seq_len", "100000"), tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


HOLD = "import sys; from sparse_transformer.runfolder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()"


def test_lock_names_the_holder_and_a_dead_holders_lock_is_taken_over(data_dir, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = rf"{re.escape(str(run))} is in use by another train process \(PID {holder.pid}\)"
        with pytest.raises(UserError, match=message):
            train(tiny(data_dir, "--train.max_steps", "2"), run)
        with pytest.raises(UserError, match=message):
            RunLock(run).acquire()
        assert os.listdir(run) == [LOCK]  # the refused train wrote nothing
    finally:
        holder.kill()  # SIGKILL: no clean-up; the lock file stays, naming a dead process
        holder.wait()
    assert (run / LOCK).read_text().strip() == str(holder.pid)
    assert train(tiny(data_dir, "--train.max_steps", "2"), run)["step"] == 2  # takes the stale lock over
    assert not (run / LOCK).exists()


def test_a_second_train_on_a_running_folder_exits_2_and_changes_nothing(data_dir, tmp_path):
    """Two `train` processes on one folder: the second is refused for as long as the first lives, so
    config.json and the checkpoint stay one model's; a lock left by a killed train is taken over."""
    run = tmp_path / "run"
    small = [*check_args(data_dir), "--data.seq_len", "64", "--model.d_model", "32", "--train.test_tokens", "256"]
    first = subprocess.Popen(
        [sys.executable, "-m", "sparse_transformer", "train", "--run-dir", str(run), *small]
        + ["--train.max_steps", "100000", "--train.checkpoint_every", "2", "--train.progress", "false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint.pt").exists():  # training, past its first checkpoint
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        config = (run / "config.json").read_bytes()
        other_model = [*small, "--model.d_model", "64"]
        r = subprocess.run(
            [sys.executable, "-m", "sparse_transformer", "train", "--run-dir", str(run), *other_model],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and f"(PID {first.pid})" in r.stderr and str(run) in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        with pytest.raises(UserError, match=rf"in use by another train process \(PID {first.pid}\)"):
            train(None, None, resume=run)
        assert (run / "config.json").read_bytes() == config
    finally:
        first.kill()
        first.wait()
    # the newest checkpoint, which resume continues: the kill can land after checkpoint-N.pt is written
    # and before checkpoint.pt is linked to it
    step = checkpoint.load(checkpoint.training_checkpoints(run)[0])["step"]
    summary = train(None, None, resume=run, overrides=["--train.max_steps", str(step + 1)])
    assert summary["step"] == step + 1 and not (run / LOCK).exists()


def test_trim_log_cuts_at_the_checkpoint_and_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "val_loss": 0.5}]
    records.sort(key=lambda r: r["step"])
    lines = [json.dumps(r) + "\n" for r in records]
    kept = "".join(lines[:5]).encode()  # steps 1-4 and the validation record of step 4
    path.write_text("".join(lines) + '{"step": 7, "lo')
    notes = trim_log(path, 4)
    assert path.read_bytes() == kept
    assert len(notes) == 1 and "line 8 was cut short" in notes[0]
    path.write_text("".join(lines[:5]) + "not json\n" + '{"step": 3')
    notes = trim_log(path, 4)
    assert path.read_bytes() == kept + b"not json\n"  # a damaged line in the middle is left alone
    assert ["line 6 is not a JSON record" in n for n in notes] == [False, True]
    assert trim_log(tmp_path / "absent.jsonl", 4) == []


def test_leftover_temporary_files_are_removed(tmp_path):
    temporary = [".checkpoint-4.pt.tmp-77", ".checkpoint.pt.tmp-123", ".config.json.tmp-9", ".samples.tmp-5.png"]
    for name in (*temporary, "keep.tmp-1", ".checkpoint.pt.tmp-x", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    assert remove_temporary_files(tmp_path) == temporary  # _atomic_write's and paths.atomic_output's names
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.pt.tmp-x", "keep.tmp-1", "metrics.jsonl"]


def test_temporary_names_are_recognized(tmp_path):
    """Every name an atomic write uses is one that remove_temporary_files removes."""
    for name in ("checkpoint.pt", "checkpoint-12.pt", "config.json", "model.safetensors", "samples.png", "LOG"):
        tmp = temporary_name(tmp_path / name)
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(Path(name).suffix)
        assert TEMPORARY.fullmatch(tmp.name), tmp.name


def test_resume_after_a_kill_mid_write(data_dir, tmp_path, capsys):
    """A run killed while writing its log and a checkpoint resumes: the cut line is dropped with a
    warning, the temporary file is removed, and the log's earlier lines are kept byte for byte."""
    run = tmp_path / "run"
    train(tiny(data_dir, "--train.max_steps", "4", "--train.checkpoint_every", "2"), run)
    log = (run / "metrics.jsonl").read_bytes()
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": 2.1')  # killed mid-write (after extending the run to 6 steps)
    (run / ".checkpoint.pt.tmp-4242").write_bytes(b"PK\x03\x04 half a checkpoint")
    capsys.readouterr()
    summary = train(None, None, resume=run, overrides=["--train.max_steps", "6"])
    out = capsys.readouterr().out
    assert summary["step"] == 6 and "line" in out and "was cut short" in out and ".checkpoint.pt.tmp-4242" in out
    assert not (run / ".checkpoint.pt.tmp-4242").exists()
    assert (run / "metrics.jsonl").read_bytes().startswith(log)
    assert [s for s, *_ in losses(run)] == list(range(1, 7))


def test_plot_reads_a_log_whose_last_line_is_being_written(tmp_path):
    from sparse_transformer.plot import read_curve

    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "val_bits_per_dim": 2.5, "train_s": 1.0}\n{"step": 5, "lo')
    assert read_curve(tmp_path)["val"] == [2.5]
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "lo\n{"step": 4, "val_bits_per_dim": 2.5}\n')
    with pytest.raises(UserError, match="line 1 is not JSON"):  # damage elsewhere is still reported
        read_curve(tmp_path)
