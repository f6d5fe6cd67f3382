"""Run a plan of training runs (the density-modelling study of docs/results.md) on one or more GPUs.

    python scripts/study.py scripts/study/text.toml --runs /tmp/runs [--out DIR] [--only NAME ...]

A plan is a TOML file:

    [data.gcide]                    # prepared once into <runs>/data/gcide unless already there
    kind = "text"
    src = ".study/gcide.txt.xz"

    [data.audio]                    # or a folder already written by `sparse-transformer prepare`
    dir = ".study/audio"

    [[run]]
    name = "text-fixed"
    data = "gcide"
    gpu = 0                         # CUDA_VISIBLE_DEVICES of the run
    queue = "a"                     # runs of one queue run one after another (default: the gpu)
    args = ["--config", "configs/enwik8.toml", "--train.max_minutes", "5"]
    samples = [["--num", "16"]]     # optional `sparse-transformer sample` calls after training

Queues run in parallel, each as its own process (`python -m sparse_transformer train ...`), so two
queues on two GPUs are an equal-wall-clock comparison and two queues on one GPU share it (only for
comparisons per step). Each run's folder keeps config.json, metrics.jsonl, train.log and samples;
with ``--out`` they are packed (without checkpoints and weights) into ``runs.tar.gz`` there, and a
table of every run is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
KEEP = (".json", ".jsonl", ".log", ".txt", ".png", ".wav")


def prepare(data: dict, runs: Path) -> dict[str, Path]:
    """Prepare every data set of the plan (skipped when its meta.json exists); name -> folder."""
    dirs = {}
    for name, spec in data.items():
        if "dir" in spec:  # prepared elsewhere (audio: decoding needs soundfile) and carried along
            dirs[name] = ROOT / spec["dir"]
            continue
        out = runs / "data" / name
        if not (out / "meta.json").is_file():
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sparse_transformer",
                    "prepare",
                    spec["kind"],
                    "--src",
                    str(ROOT / spec["src"]),
                    "--out",
                    str(out),
                ],
                check=True,
                cwd=ROOT,
            )
            print(f"prepared {name} in {time.perf_counter() - t:.0f} s", flush=True)
        dirs[name] = out
    return dirs


def run_queue(runs_spec: list[dict], runs: Path, data_dirs: dict[str, Path], results: dict) -> None:
    for spec in runs_spec:
        rd = runs / spec["name"]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(spec.get("gpu", 0)), PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            "-m",
            "sparse_transformer",
            "train",
            "--run-dir",
            str(rd),
            "--train.progress",
            "false",
            "--data.dir",
            str(data_dirs[spec["data"]]),
            *spec.get("args", []),
        ]
        rd.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with open(rd / "train.log", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        results[spec["name"]] = {"rc": rc, "wall_s": time.perf_counter() - t}
        print(f"{spec['name']}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        for i, extra in enumerate(spec.get("samples", []) if rc == 0 else []):
            cmd = [
                sys.executable,
                "-m",
                "sparse_transformer",
                "sample",
                "--run",
                str(rd),
                "--out",
                str(rd / f"samples{i}"),
                *extra,
            ]
            with open(rd / f"sample{i}.log", "w") as log:
                log.write(" ".join(cmd) + "\n")
                log.flush()
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def summarize(name: str, rd: Path, result: dict) -> dict:
    """The last train/val/test records of a run's metrics.jsonl."""
    row = {"name": name, **result}
    path = rd / "metrics.jsonl"
    if not path.is_file():
        return row
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "test_bits_per_dim" in rec:
            row.update(test=rec["test_bits_per_dim"], train_s=rec.get("train_s"), compile_s=rec.get("compile_s"))
        elif "val_bits_per_dim" in rec:
            row.update(val=rec["val_bits_per_dim"], step=rec["step"])
        elif "tokens_per_s" in rec:
            row.setdefault("tok_s", []).append(rec["tokens_per_s"])
    if "tok_s" in row:
        rates = sorted(row["tok_s"][1:] or row["tok_s"])
        row["tok_s"] = rates[len(rates) // 2]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--runs", default="runs/study", help="folder of the data and the run folders")
    ap.add_argument("--out", default=None, help="write runs.tar.gz and summary.json here")
    ap.add_argument("--only", nargs="*", default=None, help="run only these names")
    a = ap.parse_args()
    plan = tomllib.loads(Path(a.plan).read_text())
    runs = Path(a.runs).resolve()
    specs = [r for r in plan["run"] if a.only is None or r["name"] in a.only]
    data_dirs = prepare({k: v for k, v in plan.get("data", {}).items() if any(r["data"] == k for r in specs)}, runs)
    queues: dict[str, list[dict]] = {}
    for spec in specs:
        queues.setdefault(str(spec.get("queue", spec.get("gpu", 0))), []).append(spec)
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=run_queue, args=(q, runs, data_dirs, results)) for q in queues.values()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows = [summarize(s["name"], runs / s["name"], results.get(s["name"], {})) for s in specs]
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
            for s in specs:
                for f in sorted((runs / s["name"]).rglob("*")):
                    if f.is_file() and f.suffix in KEEP:
                        tar.add(f, arcname=str(f.relative_to(runs)))
        (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(
        f"{'run':24s} {'rc':>3s} {'steps':>6s} {'train s':>8s} {'compile s':>9s} {'tok/s':>9s} {'val':>7s} {'test':>7s}"
    )
    for r in rows:

        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        print(
            f"{r['name']:24s} {f('rc', '3d'):>3s} {f('step', '6d'):>6s} {f('train_s', '8.1f'):>8s} "
            f"{f('compile_s', '9.1f'):>9s} {f('tok_s', '9.0f'):>9s} {f('val', '7.3f'):>7s} {f('test', '7.3f'):>7s}"
        )


if __name__ == "__main__":
    main()
