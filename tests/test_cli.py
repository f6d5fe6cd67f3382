"""The command line: layout pictures, one-line errors with exit status 2."""

import subprocess
import sys

import pytest
from PIL import Image

from sparse_transformer.cli import main


def test_layout_ascii_and_png(tmp_path, capsys):
    png = tmp_path / "fixed.png"
    assert (
        main(
            [
                "layout",
                "--pattern",
                "fixed",
                "--n",
                "12",
                "--stride",
                "4",
                "--c",
                "1",
                "--part",
                "summary",
                "--png",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "i= 3 ...x........" in out and "i=11 ...x...x...x" in out
    assert Image.open(png).size[0] >= 12


def test_layout_large_n_uses_block_layout(tmp_path, capsys):
    png = tmp_path / "strided.png"
    assert main(["layout", "--pattern", "strided", "--n", "12288", "--stride", "128", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2,148,416 allowed pairs (2.845 % of causal)" in out and "at most 223 keys" in out
    assert max(Image.open(png).size) <= 1024


def test_bad_pattern_parameters_exit_2(capsys):
    assert main(["layout", "--pattern", "fixed", "--n", "64", "--stride", "8", "--c", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c=16 is larger than stride=8" in err[0]


def test_unknown_config_key_exit_2_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_transformer",
            "train",
            "--run-dir",
            str(tmp_path / "run"),
            "--model.n_layers",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "unknown key 'model.n_layers'" in r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_plot_runs(tmp_path, capsys):
    import json

    for name, start in (("dense", 4.0), ("fixed", 3.5)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": 10 * i, "loss": 1.0, "train_s": 6.0 * i} for i in range(1, 4)]
        lines += [{"step": 10 * i, "val_bits_per_dim": start - 0.1 * i, "train_s": 6.0 * i} for i in range(1, 4)]
        lines.append({"step": 30, "test_bits_per_dim": start - 0.3})
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "plots" / "curves.png"
    assert (
        main(["plot", str(tmp_path / "dense"), str(tmp_path / "fixed"), "--out", str(out), "--baseline", "xz -9e=2.09"])
        == 0
    )
    assert Image.open(out).size[0] > 500
    assert main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "dense"), "--out", str(out), "--baseline", "xz"]) == 2
    assert "LABEL=BITS" in capsys.readouterr().err


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, time; t = time.perf_counter(); from sparse_transformer.cli import build_parser; "
        "build_parser(); print(time.perf_counter() - t); print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'numpy', 'triton') or m.startswith('sparse_transformer.bench')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, heavy = r.stdout.splitlines()
    assert heavy == "[]" and float(seconds) < 1.0


def test_train_help_lists_config_keys_and_presets():
    r = subprocess.run(
        [sys.executable, "-m", "sparse_transformer", "train", "--help"], capture_output=True, text=True, check=True
    )
    for line in (
        "[model]",
        "--model.n_layer INT  (default 3)",
        "[train]",
        "--train.max_steps INT  (default 4000)",
        '--train.wandb STR  (default "")',
        "--model.bias BOOL  (default false)",
        "presets (--config NAME): audio, cifar10, enwik8, imagenet64",
    ):
        assert line in r.stdout, line


def test_bench_options_are_built_when_it_runs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--help"])
    assert e.value.code == 0 and "--case" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "sample", "--no-such-option"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_prepare_kinds_of_the_parser_are_the_data_packages():
    from sparse_transformer.cli import PREPARE_KINDS
    from sparse_transformer.data.prepare import KINDS

    assert PREPARE_KINDS == KINDS


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity of 139 GiB"),
         "CUDA out of memory. Tried to allocate 2.00 GiB"),
        (MemoryError(), "MemoryError"),
    ],
)  # fmt: skip
def test_out_of_memory_is_one_line_with_status_2(monkeypatch, capsys, tmp_path, error, cause):
    """A failed allocation anywhere in a command: exit status 2 and one line that quotes the first
    line of the cause (else its type name) and says what to ask for less of."""
    import sparse_transformer.cli as cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_eval", fail)
    assert main(["eval", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: out of memory ({cause}); ask for less")


def test_a_runtime_error_that_is_no_allocation_failure_propagates(monkeypatch, tmp_path):
    import sparse_transformer.cli as cli

    def fail(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "cmd_eval", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["eval", "--run", str(tmp_path)])
