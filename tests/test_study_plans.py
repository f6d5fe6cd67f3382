"""The study's plans (scripts/study/*.toml, run by scripts/study.py) stay valid as the config changes."""

import sys
from pathlib import Path

import pytest
import torch

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
