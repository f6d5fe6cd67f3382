"""torchrun integration: 2 CPU processes (gloo) train a tiny model with DDP and FSDP2, resume, evaluate."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import TINY_RUN, overrides

from sparse_transformer.evaluate import evaluate

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


def test_ddp_trains_resumes_and_sums_eval_over_ranks(data_dir, tmp_path):
    run = tmp_path / "ddp"
    out = torchrun(
        "--run-dir",
        str(run),
        "--data.dir",
        str(data_dir),
        *TINY,
        "--train.max_steps",
        "6",
        "--train.checkpoint_every",
        "3",
    )
    assert out.count("test bits per byte:") == 1  # only rank 0 prints and writes
    out = torchrun("--resume", str(run), "--train.max_steps", "9")
    recs = records(run)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 10))
    test = [r for r in recs if "test_bits_per_dim" in r][-1]
    assert test["test_tokens"] == 2000  # every test byte once, summed over both ranks' strided windows
    single = evaluate(run, device="cpu")
    assert single["tokens"] == 2000 and single["bits_per_dim"] == pytest.approx(test["test_bits_per_dim"], abs=1e-5)
    assert f"test bits per byte: {test['test_bits_per_dim']:.3f}" in out


def test_fsdp2_trains_and_its_sharded_checkpoint_loads_in_one_process(data_dir, tmp_path):
    run = tmp_path / "fsdp"
    torchrun(
        "--run-dir", str(run), "--data.dir", str(data_dir), *TINY, "--train.max_steps", "4", "--train.parallel", "fsdp"
    )
    assert (run / "checkpoint-dcp-4").is_dir() and (run / "model.safetensors").is_file()
    test = [r for r in records(run) if "test_bits_per_dim" in r][-1]
    result = evaluate(run, device="cpu")
    assert result["tokens"] == 2000 and math.isfinite(result["bits_per_dim"])
    assert result["bits_per_dim"] == pytest.approx(test["test_bits_per_dim"], abs=1e-5)
