"""Sampling under bad or extreme input: a temperature too small to divide by is greedy, never NaN;
the command refuses a negative or non-finite temperature, a negative top-k or length and
``num < 1`` with one line, before the run is loaded."""

from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
from conftest import SMALLEST_MODEL, overrides
from test_sample import PATTERNS, N, tiny

from sparse_transformer.errors import UserError
from sparse_transformer.sample import GREEDY_BELOW, Decoder, generate, is_greedy, sample_command, sample_logits

TINY_TEMPERATURES = [1e-30, 1e-40, 1e-45, 1e-50, 1e-300, 5e-324, GREEDY_BELOW, GREEDY_BELOW / 2, 0.0, -0.0, -1.0]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: decoding runs on one thread


def _logits(scale, dtype=torch.float32, seed=0):
    """Rows whose argmax is never column 0 (a NaN draw would return 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 50, generator=g) * scale
    x[:, 0] = x.amin(-1) - scale
    return x.to(dtype)


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("top_k", [0, 5])
def test_tiny_temperature_is_greedy_never_nan(temperature, scale, top_k):
    logits = _logits(scale)
    g = torch.Generator().manual_seed(1)
    got = sample_logits(logits, temperature, top_k=top_k, generator=g)
    assert torch.equal(got, logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_temperature_low_precision_logits(dtype):
    logits = _logits(100.0, dtype)
    for t in (1e-8, 1e-30, 1e-300):
        assert torch.equal(sample_logits(logits, t, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_tiny_temperature_draws_among_tied_maxima_only():
    """The limit of softmax(x / T) as T -> 0 is uniform over the largest logits: draws stay there."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 3.0, 0.5]]).expand(2000, 5)
    draws = sample_logits(logits, 1e-30, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0 and counts[1] > 800 and counts[3] > 800


def test_is_greedy_threshold():
    assert is_greedy(0.0) and is_greedy(-3.0) and is_greedy(GREEDY_BELOW / 2) and is_greedy(1.0, top_k=1)
    assert not is_greedy(GREEDY_BELOW) and not is_greedy(1e-30) and not is_greedy(1.0, top_k=2)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf])
def test_non_finite_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="finite"):
        sample_logits(_logits(1.0), temperature)
    model, cfg = tiny(**PATTERNS["local"])
    with pytest.raises(ValueError, match="finite"):
        generate(model, cfg, 1, 4, temperature=temperature)


@pytest.mark.parametrize("temperature", [1e-30, 1e-50, 0.0])
def test_generate_with_tiny_temperature_equals_greedy(temperature):
    model, cfg = tiny(**PATTERNS["fixed-both"])
    greedy = generate(model, cfg, num=2, length=N, top_k=1)
    for use_cache in (True, False):
        assert torch.equal(
            generate(model, cfg, num=2, length=N, temperature=temperature, seed=3, use_cache=use_cache), greedy
        )


def test_decoder_with_noise_and_tiny_temperature_is_greedy():
    model, cfg = tiny(**PATTERNS["strided-both"])
    with torch.inference_mode():
        tokens = torch.zeros(2, N, dtype=torch.long)
        noise = torch.empty(N, 2, 256).exponential_(1.0, generator=torch.Generator().manual_seed(0))
        decoder = Decoder(model, tokens, temperature=1e-40, noise=noise)
        for _ in range(N):
            decoder.step()
    assert torch.equal(tokens, generate(model, cfg, num=2, length=N, top_k=1))


# --------------------------------------------------------------------------------------------
# sample_command: refused with one line before the run is loaded
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_load(monkeypatch, tmp_path):
    """A checkpoint module whose load_model fails the test: the checks must come first."""
    fake = types.ModuleType("sparse_transformer.checkpoint")

    def load_model(*a, **k):
        raise AssertionError("the run was loaded before the arguments were checked")

    fake.load_model = load_model
    monkeypatch.setitem(sys.modules, "sparse_transformer.checkpoint", fake)
    return tmp_path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "--temperature -1.0 is negative"),
        ({"temperature": -1e-30}, "is negative"),
        ({"temperature": math.nan}, "not a finite number"),
        ({"temperature": math.inf}, "not a finite number"),
        ({"top_k": -1}, "--top-k -1 must be an integer >= 0"),
        ({"length": -5}, "--length -5 must be a positive integer"),
        ({"num": 0}, "--num 0"),
        ({"num": -2}, "--num -2"),
        ({"prefix_file": "."}, "is not a file"),
        ({"prefix_file": "no/such/file.bin"}, "does not exist"),
    ],
)
def test_sample_command_refuses_bad_values_before_loading(no_load, kwargs, message):
    with pytest.raises(UserError, match=message) as e:
        sample_command(no_load / "run", device="cpu", **kwargs)
    assert "\n" not in str(e.value)


def test_sample_command_refuses_a_nonpositive_configured_length(monkeypatch, tmp_path):
    model, cfg = tiny(**PATTERNS["local"])
    cfg.sample.length = -3
    fake = types.ModuleType("sparse_transformer.checkpoint")
    fake.load_model = lambda run_dir, device="cpu": (model, cfg)
    monkeypatch.setitem(sys.modules, "sparse_transformer.checkpoint", fake)
    with pytest.raises(UserError, match="-3 must be a positive integer"):
        sample_command(tmp_path, device="cpu")


def test_sample_command_tiny_temperature_writes_greedy_text(monkeypatch, tmp_path, capsys):
    model, cfg = tiny(**PATTERNS["fixed-both"])
    fake = types.ModuleType("sparse_transformer.checkpoint")
    fake.load_model = lambda run_dir, device="cpu": (model, cfg)
    monkeypatch.setitem(sys.modules, "sparse_transformer.checkpoint", fake)
    (path,) = sample_command(tmp_path, num=1, temperature=1e-40, out_dir=tmp_path / "s", device="cpu")
    greedy = generate(model, cfg, num=1, length=N, top_k=1)
    assert path.read_bytes() == bytes(greedy[0].tolist())


@pytest.mark.parametrize(
    "flag", [["--temperature", "-0.5"], ["--top-k", "-3"], ["--num", "0"], ["--temperature", "nan"]]
)
def test_cli_sample_bad_value_is_one_line_exit_2(tmp_path, flag):
    r = subprocess.run(
        [sys.executable, "-m", "sparse_transformer", "sample", "--run", str(tmp_path / "missing-run"), *flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and flag[0] in lines[0], r.stderr


def test_sample_takes_the_runs_sample_config_and_overrides(tmp_path, capsys):
    """`sample` reads the run's [sample] section; --sample.KEY overrides it; explicit flags win."""
    from sparse_transformer.cli import main
    from sparse_transformer.config import load_config
    from sparse_transformer.train import train

    steps = {"data.seq_len": 32, "train.device": "cpu", "train.max_steps": 2, "train.progress": False}
    evals = {"train.eval_batches": 1, "train.test_tokens": 64}
    cfg = load_config(None, overrides(SMALLEST_MODEL, steps, evals, {"sample.length": 12, "sample.num": 3}))
    run = tmp_path / "run"
    train(cfg, run)
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    texts = sorted((tmp_path / "a").glob("*.txt"))
    assert len(texts) == 3 and all(len(p.read_bytes()) == 12 for p in texts)  # the run's SampleConfig
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "b"), "--device", "cpu",
                 "--sample.num", "2", "--sample.length", "5", "--length", "7"]) == 0  # fmt: skip
    texts = sorted((tmp_path / "b").glob("*.txt"))
    assert len(texts) == 2 and all(len(p.read_bytes()) == 7 for p in texts)  # override, then the flag wins
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--model.n_layer", "3"]) == 2
    assert "only --sample.KEY VALUE overrides apply" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--sample.top_k", "-1"]) == 2
    assert "--top-k -1" in capsys.readouterr().err
