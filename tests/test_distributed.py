"""torchrun integration: 2 CPU processes (gloo) train a tiny model with DDP and FSDP2, resume (also on
another number of processes and with the other parallelism), evaluate."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_RUN, overrides
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from sparse_transformer import checkpoint
from sparse_transformer.evaluate import evaluate
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import make_optimizer, train

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
]

TINY = overrides(TINY_RUN, {"train.log_every": 1, "train.eval_batches": 2})


@pytest.fixture(scope="module")
def data_dir(text_data):
    return text_data("letters", 40000)  # 2,000 test bytes (conftest.py)


def torchrun(*args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sparse_transformer",
        "train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def test_ddp_trains_resumes_and_sums_eval_over_ranks(data_dir, tmp_path):
    """DDP on 2 ranks, resumed on 2 ranks with DDP and, from a copy, with FSDP2: the FSDP2 run continues
    as the DDP one does (same batches: the ranks' random states carry over; same updates up to the
    order of float sums)."""
    run = tmp_path / "ddp"
    out = torchrun("--run-dir", str(run), "--data.dir", str(data_dir), *TINY, "--train.max_steps", "3")
    assert out.count("test bits per byte:") == 1  # only rank 0 prints and writes
    shutil.copytree(run, tmp_path / "fsdp")
    out = torchrun("--resume", str(run), "--train.max_steps", "6")
    recs = records(run)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    test = [r for r in recs if "test_bits_per_dim" in r][-1]
    assert test["test_tokens"] == 2000  # every test byte once, summed over both ranks' strided windows
    single = evaluate(run, device="cpu")
    assert single["tokens"] == 2000 and single["bits_per_dim"] == pytest.approx(test["test_bits_per_dim"], abs=1e-5)
    assert f"test bits per byte: {test['test_bits_per_dim']:.3f}" in out
    torchrun("--resume", str(tmp_path / "fsdp"), "--train.max_steps", "6", "--train.parallel", "fsdp")
    resumed = losses(tmp_path / "fsdp")
    assert sorted(resumed) == list(range(1, 7)) and (tmp_path / "fsdp" / "checkpoint-dcp-6").is_dir()
    assert resumed == pytest.approx(losses(run), rel=1e-5)


def test_fsdp2_run_resumes_in_one_process_and_then_on_two_ranks(data_dir, tmp_path):
    """A run trained with FSDP2 on 2 ranks: its shards load in one process (evaluation, and a resume
    with its weights and optimizer state as saved), and the one-process run resumes on 2 ranks (DDP)."""
    run = tmp_path / "fsdp"
    torchrun(
        "--run-dir", str(run), "--data.dir", str(data_dir), *TINY, "--train.max_steps", "4", "--train.parallel", "fsdp"
    )
    assert (run / "checkpoint-dcp-4").is_dir() and (run / "model.safetensors").is_file()
    test = [r for r in records(run) if "test_bits_per_dim" in r][-1]
    result = evaluate(run, device="cpu")
    assert result["tokens"] == 2000 and math.isfinite(result["bits_per_dim"])
    assert result["bits_per_dim"] == pytest.approx(test["test_bits_per_dim"], abs=1e-5)

    cfg = checkpoint.read_run_config(run)
    model = SparseTransformer(cfg.model)
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    state = checkpoint.load_training(run, model, optimizer)
    assert state["step"] == 4 and len(state["ranks"]) == 2
    exported = load_file(run / "model.safetensors")
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    dcp_to_torch_save(run / "checkpoint-dcp-4", tmp_path / "raw.pt")  # torch's own reader, on our own files
    saved = torch.load(tmp_path / "raw.pt", weights_only=False)["optimizer"]["state"]
    names = {p: n for n, p in model.named_parameters()}
    assert len(optimizer.state) == len(names) == len(saved)
    for p, moments in optimizer.state.items():
        assert moments["step"].item() == 4
        assert all(torch.equal(moments[k], saved[names[p]][k]) for k in ("exp_avg", "exp_avg_sq"))

    summary = train(None, None, resume=run, overrides=["--train.max_steps", "6"])
    assert summary["step"] == 6 and sorted(losses(run)) == list(range(1, 7))
    assert "model" in checkpoint.load(run / "checkpoint.pt")
    assert [p.name for p in run.glob("checkpoint-dcp-*")] == ["checkpoint-dcp-4"]  # named by checkpoint-4.pt, kept
    torchrun("--resume", str(run), "--train.max_steps", "8", "--train.parallel", "ddp")
    assert sorted(losses(run)) == list(range(1, 9)) and not list(run.glob("checkpoint-dcp-*"))
    ranks = checkpoint.load(run / "checkpoint.pt")["ranks"]
    assert len(ranks) == 2 and ranks[0]["rng"]["numpy"] != ranks[1]["rng"]["numpy"]  # the new rank draws its own
