"""The study's plans (scripts/study/*.toml, run by scripts/study.py) stay valid as the config changes."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALLEST_MODEL, overrides

import sparse_transformer as st
from sparse_transformer.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PLANS = sorted((ROOT / "scripts" / "study").glob("*.toml"))


@pytest.mark.parametrize("plan", PLANS, ids=[p.stem for p in PLANS])
def test_plan_runs_resolve(plan, monkeypatch):
    monkeypatch.chdir(ROOT)  # plans name presets relative to the repository root
    table = tomllib.loads(plan.read_text())
    assert table["run"], f"{plan.name} has no [[run]]"
    names = [r["name"] for r in table["run"]]
    assert len(set(names)) == len(names), f"{plan.name}: run names must be unique"
    for run in table["run"]:
        assert run["data"] in table["data"], f"{run['name']}: unknown data {run['data']!r}"
        args = list(run["args"])
        preset = None
        if "--config" in args:
            i = args.index("--config")
            preset = args[i + 1]
            del args[i : i + 2]
        cfg = load_config(preset, args)
        with torch.device("meta"):
            model = st.SparseTransformer(cfg.model)
        assert model.num_params() > 0


def test_ablation_plans_differ_only_in_biases_where_named():
    first = tomllib.loads((ROOT / "scripts/study/ablation.toml").read_text())["run"]
    assert all("--model.bias" in r["args"] and r["args"][r["args"].index("--model.bias") + 1] == "true" for r in first)


def test_study_driver_runs_a_plan_and_packs_the_runs(tmp_path):
    """scripts/study.py on the CPU: two queues at once, a sample call, the summary table and archive."""
    import json
    import subprocess
    import tarfile

    text = tmp_path / "corpus.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    run = {"data.seq_len": 32, "train.device": "cpu", "train.batch_size": 2, "train.max_steps": 3}
    evals = {"train.eval_every": 2, "train.eval_batches": 1, "train.test_tokens": 64, "sample.length": 8}
    tiny = overrides(SMALLEST_MODEL, run, evals)
    runs = "".join(
        f'[[run]]\nname = "{name}"\ndata = "toy"\nqueue = "{name}"\nargs = {json.dumps(tiny + extra)}\n'
        f'samples = [["--num", "1", "--length", "8", "--device", "cpu"]]\n\n'
        for name, extra in (("a", []), ("b", ["--model.pattern", "strided"]))
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[data.toy]\nkind = "text"\nsrc = "{text}"\n\n{runs}')
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "study.py"),
            str(plan),
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.strip().splitlines()
    assert table[-3].split()[:2] == ["run", "rc"] and [line.split()[:3] for line in table[-2:]] == [
        ["a", "0", "3"],
        ["b", "0", "3"],
    ]
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["name"] for r in rows] == ["a", "b"] and all(r["test"] > 0 for r in rows)
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"a/metrics.jsonl", "a/config.json", "b/train.log", "b/samples0/sample_000.txt"} <= names
    assert not [n for n in names if n.endswith((".pt", ".safetensors"))]
