"""Faults under torchrun (2 CPU processes, gloo): a NaN loss on one rank is skipped on both, SIGTERM
to one rank stops both at the same step with a checkpoint, for DDP and FSDP2 (tests/fault_worker.py
injects the faults)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import FAULT_RUN, overrides

from sparse_transformer import checkpoint, parallel

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
]

WORKER = str(Path(__file__).with_name("fault_worker.py"))


@pytest.fixture(scope="module")
def data_dir(text_data):
    return text_data("letters", 40000)  # conftest.py


def tiny(data_dir, *extra):
    return [*overrides({"data.dir": data_dir}, FAULT_RUN, {"train.checkpoint_every": 0}), *extra]


def test_shutdown_of_a_finished_run_meets_at_a_barrier_then_leaves(monkeypatch):
    """parallel.shutdown(finished=True): a barrier, then destroy_process_group (gloo's worker threads
    release the last collectives' tensors, which takes the GIL, while this process waits there, not
    during interpreter finalization); without ``finished`` no barrier; the group is left even when
    the barrier fails (a peer that died)."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    parallel.shutdown(finished=True)
    parallel.shutdown()
    assert calls == ["barrier", "destroy", "destroy"]

    def dead_peer():
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "barrier", dead_peer)
    with pytest.raises(RuntimeError, match="closed by peer"):
        parallel.shutdown(finished=True)
    assert calls == ["barrier", "destroy", "destroy", "destroy"]


def torchrun(faults, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULTS": faults, "FAULT_RANK": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def train_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]


@pytest.mark.parametrize(("parallel", "dtype"), [("ddp", "fp32"), ("fsdp", "fp16")])
def test_one_rank_nan_and_one_rank_sigterm(data_dir, tmp_path, parallel, dtype):
    """Rank 1 alone sees a NaN loss in step 2 and SIGTERM in step 4: both ranks skip step 2 (under
    fp16 with the grad scaler), and both stop after step 4 with that step's checkpoint; rank 0, which
    got no signal, says so. The resumed run goes on from there."""
    run = tmp_path / "run"
    r = torchrun(
        "nan:2,sigterm:4",
        "--run-dir",
        str(run),
        *tiny(data_dir, "--train.max_steps", "50"),
        "--train.parallel",
        parallel,
        "--train.dtype",
        dtype,
    )
    assert r.returncode != 0  # the workers exited with 143: torchrun reports the job as not finished
    assert f"stopped by SIGTERM at step 4; checkpoint saved to {run / 'checkpoint-4.pt'}; " in r.stderr, r.stderr[
        -3000:
    ]
    recs = train_records(run)
    assert [(x["step"], x["skipped_steps"]) for x in recs] == [(1, 0), (2, 1), (3, 0), (4, 0)]
    state = checkpoint.load(run / "checkpoint.pt")
    assert state["step"] == 4 and state["skips"]["total"] == 1 and len(state["ranks"]) == 2
    if parallel == "ddp":  # replicated weights: the ranks took the same steps
        sums = [(run / f"weights-rank{k}-step4.txt").read_text() for k in (0, 1)]
        assert sums[0] == sums[1]
        assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}
    else:
        assert (run / "checkpoint-dcp-4").is_dir()

    r = torchrun("", "--resume", str(run), "--train.max_steps", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in train_records(run)] == [1, 2, 3, 4, 5, 6]
