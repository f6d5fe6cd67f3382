"""Bad input to every command: one line naming the problem and the fix, exit status 2, no traceback,
and every file that was there before left as it was (issue 10, item 7).

The table runs the command line in-process (``cli.main``); each case gets its own folder with a copy
of a tiny trained run, a prepared data folder and a file ``afile`` where a folder may be expected.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from sparse_transformer.cli import main
from sparse_transformer.config import RANGES, SECTIONS, Config, load_config, validate
from sparse_transformer.errors import UserError

TINY = [
    "--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "2", "--model.stride", "8", "--model.c", "2",
    "--data.seq_len", "32", "--train.device", "cpu", "--train.max_steps", "2", "--train.warmup_steps", "1",
    "--train.eval_batches", "1", "--train.test_tokens", "64", "--train.progress", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(text_data, tmp_path_factory):
    """A tiny trained run (checkpoint, export, config.json, metrics.jsonl) and its data."""
    data = text_data("letters", 20_000)
    run = tmp_path_factory.mktemp("bad-input") / "run"
    assert main(["train", "--run-dir", str(run), "--data.dir", str(data), *TINY]) == 0
    return run, data


def T(*more: str) -> list[str]:
    """``train`` of the tiny config into a new folder, with ``more`` overrides."""
    return ["train", "--run-dir", "{ws}/new", "--data.dir", "{data}", *TINY, *more]


def meta(**fields):
    """Setup: ``{ws}/data``, a copy of the data whose meta.json has ``fields`` replaced."""

    def setup(ws: Path, data: Path) -> None:
        shutil.copytree(data, ws / "data")
        m = json.loads((ws / "data" / "meta.json").read_text())
        m.update(fields)
        (ws / "data" / "meta.json").write_text(json.dumps(m))

    return setup


def config_json(**sections):
    """Setup: the run's config.json with the keys of ``sections`` (``{"train": {"lr": -1}}``) replaced."""

    def setup(ws: Path, data: Path) -> None:
        path = ws / "run" / "config.json"
        cfg = json.loads(path.read_text())
        for section, values in sections.items():
            cfg[section] = values if not isinstance(values, dict) else {**cfg[section], **values}
        path.write_text(json.dumps(cfg))

    return setup


def write(name: str, content: str | bytes):
    def setup(ws: Path, data: Path) -> None:
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    return setup


def folder(name: str):
    """Setup: the file ``name`` replaced by a folder of that name."""

    def setup(ws: Path, data: Path) -> None:
        (ws / name).unlink()
        (ws / name).mkdir()

    return setup


def link_loop(name: str):
    """Setup: the file ``name`` replaced by a symbolic link to itself."""

    def setup(ws: Path, data: Path) -> None:
        (ws / name).unlink()
        (ws / name).symlink_to((ws / name).name)

    return setup


NESTED = "[" * 100_000 + "]" * 100_000  # valid JSON that Python's parser cannot read (RecursionError)


def metrics(*records):
    return write("r1/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


GOOD = {"step": 1, "val_bits_per_dim": 2.0, "train_s": 1.0}
L = ["layout", "--pattern", "fixed", "--n", "64", "--stride", "8", "--c", "2"]

# (id, command line, a fragment of the one-line message, setup or None)
CASES = [
    # train: optimizer and schedule values (the RANGES table)
    ("lr zero", T("--train.lr", "0"), "train.lr = 0.0 must be > 0", None),
    ("lr negative", T("--train.lr", "-1e-3"), "train.lr = -0.001 must be > 0", None),
    ("lr nan", T("--train.lr", "nan"), "train.lr = nan is not a finite number; use a finite value > 0", None),
    ("lr inf", T("--train.lr", "inf"), "train.lr = inf is not a finite number", None),
    ("beta1 one", T("--train.beta1", "1"), "train.beta1 = 1.0 must be in [0, 1)", None),
    ("beta2 negative", T("--train.beta2", "-0.5"), "train.beta2 = -0.5 must be in [0, 1)", None),
    ("weight decay negative", T("--train.weight_decay", "-0.1"), "train.weight_decay = -0.1 must be >= 0", None),
    ("eps zero", T("--train.eps", "0"), "train.eps = 0.0 must be > 0", None),
    ("grad clip nan", T("--train.grad_clip", "nan"), "train.grad_clip = nan is not a finite", None),
    ("min lr ratio above 1", T("--train.min_lr_ratio", "2"), "train.min_lr_ratio = 2.0 must be in [0, 1]", None),
    ("warmup negative", T("--train.warmup_steps", "-1"), "train.warmup_steps = -1 must be >= 0", None),
    ("max minutes inf", T("--train.max_minutes", "inf"), "train.max_minutes = inf is not a finite", None),
    ("eval every negative", T("--train.eval_every", "-5"), "train.eval_every = -5 must be >= 0", None),
    ("eval batches negative", T("--train.eval_batches", "-1"), "train.eval_batches = -1 must be >= 0", None),
    ("checkpoint every negative", T("--train.checkpoint_every", "-1"), "train.checkpoint_every = -1", None),
    ("test tokens negative", T("--train.test_tokens", "-64"), "train.test_tokens = -64 must be >= 0", None),
    ("seed negative", T("--train.seed", "-1"), "train.seed = -1 must be in [0, 2**63 - 1]", None),
    ("seed too large", T("--train.seed", str(2**64)), "train.seed = 18446744073709551616 is too large", None),
    ("steps beyond int64", T("--train.max_steps", str(10**22)), "train.max_steps = 1" + "0" * 22 + " is too large", None),
    ("batch float", T("--train.batch_size", "1e3"), "train.batch_size = '1e3' is not a valid int", None),
    ("device unknown", T("--train.device", "gpu"), "train.device = 'gpu'; use one of auto, cpu, cuda", None),
    ("dtype unknown", T("--train.dtype", "float32"), "train.dtype = 'float32'; choose one of auto", None),
    # train: model widths and the data, sample sections
    ("vocab below bytes", T("--model.vocab_size", "100"), "model.vocab_size = 100 must be >= 256", None),
    ("heads zero", T("--model.n_head", "0"), "model.n_head = 0 must be >= 1", None),
    ("width not divisible", T("--model.d_model", "15"), "d_model = 15 is not divisible by model.n_head = 2", None),
    ("ff mult zero", T("--model.ff_mult", "0"), "model.ff_mult = 0.0 must be > 0", None),
    ("ff width rounds to 0", T("--model.ff_mult", "0.01"), "gives a feed-forward width of 0", None),
    ("qk ratio nan", T("--model.qk_ratio", "nan"), "model.qk_ratio = nan is not a finite number", None),
    ("ln eps zero", T("--model.ln_eps", "0"), "model.ln_eps = 0.0 must be > 0", None),
    ("sdpa with a sparse pattern", T("--model.backend", "sdpa"), "'sdpa' computes only the dense pattern", None),
    ("triton on cpu", T("--model.backend", "triton"), "model.backend 'triton' needs a CUDA device", None),
    ("model beyond memory", T("--model.d_model", "1000000", "--model.n_head", "1"), "exceed the", None),
    ("data shape of two", T("--data.shape", "1,2"), "data.shape = [1, 2] must be [height, width, channels]", None),
    ("sample rate negative", T("--data.sample_rate", "-1"), "data.sample_rate = -1 must be >= 0", None),
    ("sample temperature nan", T("--sample.temperature", "nan"), "sample.temperature = nan is not a finite", None),
    ("sample length negative", T("--sample.length", "-1"), "sample.length = -1 must be >= 0", None),
    ("sample seed negative", T("--sample.seed", "-1"), "sample.seed = -1 must be in [0, 2**63 - 1]", None),
    ("sample longer than context", T("--sample.length", "100"), "sample.length = 100 is longer than the model's", None),
    ("image shape of zeros", T("--model.image_shape", "0,0,0"), "model.image_shape = [0, 0, 0] must be", None),
    # train: config files
    ("config is a folder", ["train", "--config", "{ws}"], "is a folder; pass a TOML file", None),
    ("toml unknown key", ["train", "--config", "{ws}/c.toml"], "unknown key 'model.n_layerz'", write("c.toml", "[model]\nn_layerz = 2\n")),
    ("toml wrong type", ["train", "--config", "{ws}/c.toml"], "c.toml: model.n_layer = 'two' is not a valid int", write("c.toml", "[model]\nn_layer = 'two'\n")),
    ("toml section is a value", ["train", "--config", "{ws}/c.toml"], "model = 3 is not a section", write("c.toml", "model = 3\n")),
    ("toml bad syntax", ["train", "--config", "{ws}/c.toml"], "is not valid TOML", write("c.toml", "[model\n")),
    ("toml not utf-8", ["train", "--config", "{ws}/c.toml"], "cannot read", write("c.toml", b"\xff\xfe[model]\n")),
    ("toml lr out of range", ["train", "--config", "{ws}/c.toml"], "train.lr = -1.0 must be > 0", write("c.toml", "[train]\nlr = -1.0\n")),
    # train: run folders
    ("run dir is a file", T()[:2] + ["{ws}/afile", *T()[3:]], "--run-dir {ws}/afile is a file; pass a folder", None),
    ("run dir below a file", T()[:2] + ["{ws}/afile/run", *T()[3:]], "{ws}/afile is a file, not a folder", None),
    ("run dir with a foreign config.json", T()[:2] + ["{ws}/mine", *T()[3:]], "already holds config.json but no checkpoint", write("mine/config.json", '{"mine": 1}')),
    ("run dir with a metrics log", T()[:2] + ["{ws}/mine", *T()[3:]], "already holds metrics.jsonl", write("mine/metrics.jsonl", '{"step": 5}\n')),
    # meta.json of the data: fields of the wrong type or range
    ("meta splits a string", T("--data.dir", "{ws}/data"), "splits = 'abc' is not a byte count", meta(splits="abc")),
    ("meta record_len a string", T("--data.dir", "{ws}/data"), "record_len = 'x' is neither null nor", meta(record_len="x")),
    ("meta shape a string", T("--data.dir", "{ws}/data"), "shape = 'abc' is neither null nor", meta(shape="abc")),
    ("meta rate a string", T("--data.dir", "{ws}/data"), "sample_rate = 'fast' is neither null", meta(sample_rate="fast")),
    ("meta modality unknown", T("--data.dir", "{ws}/data"), "modality = 'video' is not one of", meta(modality="video")),
    ("meta version a string", T("--data.dir", "{ws}/data"), "format_version '1', this version reads 1", meta(format_version="1")),
    ("meta image without shape", T("--data.dir", "{ws}/data"), "image data need a shape", meta(modality="image", record_len=1000)),
    ("eval meta record_len", ["eval", "--run", "{ws}/run", "--data", "{ws}/data"], "record_len = 'x'", meta(record_len="x")),
    # eval
    ("eval max tokens zero", ["eval", "--run", "{ws}/run", "--max-tokens", "0"], "--max-tokens 0 must be positive", None),
    ("eval max tokens text", ["eval", "--run", "{ws}/run", "--max-tokens", "ten"], "argument --max-tokens: invalid int value: 'ten'", None),
    ("eval unknown split", ["eval", "--run", "{ws}/run", "--split", "dev"], "argument --split: invalid choice: 'dev'", None),
    ("eval unknown option", ["eval", "--run", "{ws}/run", "--bogus"], "unrecognized arguments: --bogus", None),
    ("eval device unknown", ["eval", "--run", "{ws}/run", "--device", "gpu"], "--device 'gpu' is not a device", None),
    ("eval data missing", ["eval", "--run", "{ws}/run", "--data", "{ws}/nope"], "meta.json is missing", None),
    ("eval run is a file", ["eval", "--run", "{ws}/afile"], "--run {ws}/afile is a file; pass the run's folder", None),
    ("sample run is a file", ["sample", "--run", "{ws}/afile"], "--run {ws}/afile is a file; pass the run's folder", None),
    ("eval config.json a list", ["eval", "--run", "{ws}/run"], "config.json holds no config (a JSON object of sections)", write("run/config.json", "[1]")),
    ("eval config.json nested too deep", ["eval", "--run", "{ws}/run"], "config.json is not valid JSON (maximum recursion", write("run/config.json", NESTED)),
    ("eval config.json a folder", ["eval", "--run", "{ws}/run"], "config.json is a folder, not a file", folder("run/config.json")),
    ("eval checkpoint a link loop", ["eval", "--run", "{ws}/run"], "checkpoint.pt: it is a symbolic link that leads back to itself", link_loop("run/checkpoint.pt")),
    ("resume checkpoints link loops", ["train", "--resume", "{ws}/run"], "leads back to itself; remove the link", lambda ws, d: [link_loop(f"run/{n}")(ws, d) for n in ("checkpoint.pt", "checkpoint-2.pt")]),
    ("resume newest checkpoint a folder", ["train", "--resume", "{ws}/run"], "checkpoint-2.pt is a folder where a checkpoint file belongs", folder("run/checkpoint-2.pt")),
    ("eval meta.json nested too deep", ["eval", "--run", "{ws}/run", "--data", "{ws}/data"], "meta.json is unreadable", lambda ws, d: (meta()(ws, d), write("data/meta.json", NESTED)(ws, d))),
    ("plot record nested too deep", ["plot", "{ws}/r1", "--out", "{ws}/o.png"], "line 1 is not JSON", write("r1/metrics.jsonl", NESTED + "\n")),
    ("export over the run itself", ["export", "--run", "{ws}/run", "--out", "{ws}/run/."], "is the folder being exported (--run); choose another folder", None),
    ("sample prefix as long as the sample", ["sample", "--run", "{ws}/run", "--prefix", "{ws}/p.bin", "--length", "8"], "8 bytes, all of the sample length 8, which leaves nothing to sample", write("p.bin", b"a" * 8)),
    ("eval config.json batch 0", ["eval", "--run", "{ws}/run"], "config config.json: train.batch_size = 0", config_json(train={"batch_size": 0})),
    # sample
    ("sample seed negative", ["sample", "--run", "{ws}/run", "--seed", "-1"], "--seed -1 must be an integer from 0", None),
    ("sample seed too large", ["sample", "--run", "{ws}/run", "--seed", str(2**70)], "must be an integer from 0 to 2**63 - 1", None),
    ("sample override seed", ["sample", "--run", "{ws}/run", "--sample.seed", "-4"], "--seed -4 must be an integer", None),
    ("sample num text", ["sample", "--run", "{ws}/run", "--num", "x"], "argument --num: invalid int value: 'x'", None),
    ("sample out is a file", ["sample", "--run", "{ws}/run", "--out", "{ws}/afile"], "--out {ws}/afile is a file", None),
    ("sample out below a file", ["sample", "--run", "{ws}/run", "--out", "{ws}/afile/s"], "{ws}/afile is a file, not a folder", None),
    ("sample image shape of two", ["sample", "--run", "{ws}/run"], "data.shape = [2, 2] must be", config_json(data={"modality": "image", "shape": [2, 2]})),
    ("sample audio without rate", ["sample", "--run", "{ws}/run"], "audio data need their rate", config_json(data={"modality": "audio", "sample_rate": 0})),
    # prepare
    ("prepare rate negative", ["prepare", "text", "--src", "{ws}/afile", "--out", "{ws}/o", "--rate", "-5"], "--rate -5 must be a positive", None),
    ("prepare unknown kind", ["prepare", "gif", "--src", "{ws}/afile", "--out", "{ws}/o"], "argument kind: invalid choice: 'gif'", None),
    ("prepare without out", ["prepare", "text", "--src", "{ws}/afile"], "the following arguments are required: --out", None),
    ("prepare over its own source", ["prepare", "text", "--src", "{ws}/data/train.bin", "--out", "{ws}/data"], "is a file that prepare writes in --out", meta()),
    ("prepare out is a file", ["prepare", "text", "--src", "{ws}/afile", "--out", "{ws}/afile"], "cannot create output folder", None),
    # layout
    ("layout head negative", [*L, "--head", "-1"], "--head -1 must be at least 0", None),
    ("layout layer negative", [*L, "--layer", "-1"], "--layer -1 must be at least 0", None),
    ("layout block zero", [*L, "--block", "0"], "--block 0 must be at least 1", None),
    ("layout n huge", [*L, "--n", str(10**15)], "must be from 1 to 16,777,216", None),
    ("layout local without window", ["layout", "--pattern", "local", "--n", "64"], "needs --stride (l; for local the window)", None),
    ("layout png is a folder", [*L, "--png", "{ws}"], "--png {ws} is a folder", None),
    ("layout png unknown type", [*L, "--png", "{ws}/x.xyz"], "the file type .xyz cannot be written", None),
    ("layout png below a file", [*L, "--png", "{ws}/afile/x.png"], "{ws}/afile is a file, not a folder", None),
    # plot
    ("plot record a list", ["plot", "{ws}/r1", "--out", "{ws}/o.png"], "not a training record", metrics([1, 2])),
    ("plot record without step", ["plot", "{ws}/r1", "--out", "{ws}/o.png"], "not a training record", metrics({"val_bits_per_dim": 1.0})),
    ("plot bits a string", ["plot", "{ws}/r1", "--out", "{ws}/o.png"], "is not a number", metrics({**GOOD, "val_bits_per_dim": "abc"})),
    ("plot not utf-8", ["plot", "{ws}/r1", "--out", "{ws}/o.png"], "metrics.jsonl", write("r1/metrics.jsonl", b"\xff\xfe\x00")),
    ("plot out is a folder", ["plot", "{ws}/r1", "--out", "{ws}"], "--out {ws} is a folder", metrics(GOOD)),
    ("plot out over the log", ["plot", "{ws}/r1", "--out", "{ws}/r1/metrics.jsonl"], "file type .jsonl cannot be written", metrics(GOOD)),
    ("plot baseline nan", ["plot", "{ws}/r1", "--out", "{ws}/o.png", "--baseline", "x=nan"], "must look like LABEL=BITS", metrics(GOOD)),
    # bench
    ("bench attention n zero", ["bench", "attention", "--n", "0"], "--n 0 must be at least 1", None),
    ("bench attention heads zero", ["bench", "attention", "--heads", "0"], "--heads 0 must be at least 1", None),
    ("bench attention batch tokens zero", ["bench", "attention", "--batch-tokens", "0"], "--batch-tokens 0 must be", None),
    ("bench attention out is a folder", ["bench", "attention", "--out", "{ws}"], "--out {ws} is a folder", None),
    ("bench train steps zero", ["bench", "train", "--steps", "0"], "argument --steps: 0 must be at least 1", None),
    ("bench train n zero", ["bench", "train", "--n", "0"], "argument --n: 0 must be at least 1", None),
    ("bench sample width", ["bench", "sample", "--d-model", "7"], "d_model = 7 is not divisible", None),
    ("bench sample device", ["bench", "sample", "--device", "gpu"], "--device 'gpu' is not a device", None),
    ("bench sample threads", ["bench", "sample", "--threads", "-1"], "argument --threads: -1 must be at least 0", None),
    ("no command", [], "the following arguments are required: command", None),
    ("unknown command", ["frobnicate"], "invalid choice: 'frobnicate'", None),
]  # fmt: skip


def _fields(section) -> dict[str, type]:
    """The field types of a config section object (``{"lr": float, ...}``)."""
    import typing

    return typing.get_type_hints(type(section))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _workspace(tmp_path: Path, trained) -> Path:
    run, _ = trained
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(run, ws / "run")
    (ws / "afile").write_text("keep me\n")
    return ws


def run_bad(argv: list[str], ws: Path, data: Path, capsys) -> str:
    """Run the command; assert exit 2, one stderr line without a traceback, every earlier file
    unchanged; return the line."""
    argv = [a.replace("{ws}", str(ws)).replace("{data}", str(data)) for a in argv]
    before = {**_snapshot(ws), **_snapshot(data)}
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    after = {**_snapshot(ws), **_snapshot(data)}
    assert {k: after.get(k) for k in before} == before, "a file that was there before changed or vanished"
    return lines[0]


@pytest.mark.parametrize("argv, fragment, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_keeps_files(trained, tmp_path, capsys, argv, fragment, setup):
    ws = _workspace(tmp_path, trained)
    if setup is not None:
        setup(ws, trained[1])
    line = run_bad(argv, ws, trained[1], capsys)
    assert fragment.replace("{ws}", str(ws)) in line, line
    assert line.startswith("error: ")


# --------------------------------------------------------------------------------------------
# Unwritable folders and full disks (simulated in-process)
# --------------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_read_only_output_folders_are_refused_before_any_work(trained, tmp_path, capsys, monkeypatch):
    import os

    ws = _workspace(tmp_path, trained)
    (ws / "ro").mkdir()
    real = os.access
    monkeypatch.setattr("sparse_transformer.paths.os.access", lambda p, mode: Path(p) != ws / "ro" and real(p, mode))
    for argv in (
        T()[:2] + ["{ws}/ro/run", *T()[3:]],
        ["sample", "--run", "{ws}/run", "--out", "{ws}/ro/s"],
        [*L, "--png", "{ws}/ro/x.png"],
    ):
        line = run_bad(argv, ws, trained[1], capsys)
        assert "permission denied or a read-only file system" in line, line
    assert not list((ws / "ro").iterdir())


def test_full_disk_while_training_writes_keeps_nothing_half_written(trained, tmp_path, capsys, monkeypatch):
    """ENOSPC where the disk reports it (fsync of an atomic write): one line naming the fix, no
    temporary file left, nothing that was there changed."""
    ws = _workspace(tmp_path, trained)
    monkeypatch.setattr("os.fsync", _no_space)
    line = run_bad(T(), ws, trained[1], capsys)
    assert "No space left on device" in line and "free some space" in line
    assert not [p for p in (ws / "new").rglob("*") if p.is_file()]


def test_full_disk_keeps_the_earlier_picture_and_samples(trained, tmp_path, capsys, monkeypatch):
    from PIL import Image

    ws = _workspace(tmp_path, trained)
    (ws / "x.png").write_bytes(b"an earlier picture")
    (ws / "s").mkdir()
    (ws / "s" / "sample_000.txt").write_text("an earlier sample")

    def partial_then_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a pic")
        _no_space()

    monkeypatch.setattr(Image.Image, "save", partial_then_full)
    line = run_bad([*L, "--png", "{ws}/x.png"], ws, trained[1], capsys)
    assert f"No space left on device ({ws / 'x.png'})" in line
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _no_space())
    run_bad(["sample", "--run", "{ws}/run", "--out", "{ws}/s", "--length", "8"], ws, trained[1], capsys)
    assert sorted(p.name for p in ws.iterdir()) == ["afile", "run", "s", "x.png"]  # no temporary files left
    assert [p.name for p in (ws / "s").iterdir()] == ["sample_000.txt"]


def test_full_disk_while_preparing_keeps_the_old_data(trained, tmp_path, capsys, monkeypatch):
    ws = _workspace(tmp_path, trained)
    shutil.copytree(trained[1], ws / "data")
    (ws / "corpus.txt").write_bytes(b"new text " * 500)
    monkeypatch.setattr("os.fsync", _no_space)
    line = run_bad(["prepare", "text", "--src", "{ws}/corpus.txt", "--out", "{ws}/data"], ws, trained[1], capsys)
    assert "No space left on device" in line
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin"]


def test_prepare_names_a_full_output_disk_not_the_source(tmp_path, monkeypatch):
    """A write error while copying the source is the output's: the message must not blame --src."""
    import importlib

    prep = importlib.import_module("sparse_transformer.data.prepare")  # the module, not data.prepare()

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            _no_space()

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = prep._SplitWriter.__enter__

    def enter(self):
        real(self)
        self.files = {s: Full(f) for s, f in self.files.items()}
        return self

    (tmp_path / "corpus.txt").write_bytes(b"text " * 1000)
    monkeypatch.setattr(prep._SplitWriter, "__enter__", enter)
    with pytest.raises(UserError, match="cannot write into .*free some space or pass another --out"):
        prep.prepare("text", tmp_path / "corpus.txt", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------
# What bad input must not stop, and the schema itself
# --------------------------------------------------------------------------------------------


def test_sampling_again_keeps_the_earlier_samples(trained, tmp_path, capsys):
    ws = _workspace(tmp_path, trained)
    out = ws / "s"
    for _ in range(2):
        assert main(["sample", "--run", str(ws / "run"), "--out", str(out), "--num", "2", "--length", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"sample_00{i}.txt" for i in range(4)]


def test_an_empty_prefix_file_samples_without_a_prefix(trained, tmp_path, capsys):
    ws = _workspace(tmp_path, trained)
    (ws / "empty").write_bytes(b"")
    argv = ["sample", "--run", str(ws / "run"), "--prefix", str(ws / "empty"), "--length", "8", "--out", str(ws / "s")]
    assert main(argv) == 0
    assert len((ws / "s" / "sample_000.txt").read_bytes()) == 8


def test_tiny_temperature_is_greedy_from_the_command_line(trained, tmp_path, capsys):
    ws = _workspace(tmp_path, trained)
    argv = ["sample", "--run", str(ws / "run"), "--length", "16", "--out"]
    assert main([*argv, str(ws / "a"), "--temperature", "1e-45"]) == 0
    assert main([*argv, str(ws / "b"), "--top-k", "1"]) == 0
    assert (ws / "a" / "sample_000.txt").read_bytes() == (ws / "b" / "sample_000.txt").read_bytes()


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "enwik8").mkdir()  # e.g. the data prepared by `prepare enwik8 --out enwik8`
    assert load_config("enwik8").data.seq_len == 12288


def test_ranges_name_real_fields_and_hold_the_defaults():
    import typing

    numeric = {
        f"{s}.{k}"
        for s in SECTIONS
        for k, t in _fields(getattr(Config(), s)).items()
        if t in (int, float) and f"{s}.{k}" != "model.n_ctx"
    }
    assert set(RANGES) <= numeric, set(RANGES) - numeric
    cfg = validate(Config())  # every default lies in its range
    for key, rng in RANGES.items():
        section, _, name = key.partition(".")
        assert getattr(getattr(cfg, section), name) in rng, key
    assert typing.get_type_hints(Config)  # the schema is typed


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_refuses_nan_and_what_lies_outside(key):
    """Each numeric field: NaN (floats) and a value just outside its range give one line naming it."""
    rng = RANGES[key]
    section, _, name = key.partition(".")
    typ = _fields(getattr(Config(), section))[name]
    outside = []
    if rng.low is not None:
        outside.append(rng.low - (0 if rng.low_open else 1 if typ is int else 1e-3))
    if rng.high is not None:
        outside.append(rng.high + (0 if rng.high_open else 1 if typ is int else 1e-3))
    if typ is float:
        outside.append(math.nan)
    for value in outside:
        with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
            load_config(None, [f"--{key}", str(value)])
        assert "\n" not in str(e.value)


def test_eval_and_sample_of_a_gpu_backend_run_fall_back_on_cpu(trained, tmp_path, capsys):
    """A run trained with --model.backend triton (on a GPU) is scored and sampled on a CPU with the
    backend auto picks there (the same numbers), and says so; training with it on a CPU is refused."""
    ws = _workspace(tmp_path, trained)
    config_json(model={"backend": "triton"})(ws, trained[1])
    run = str(ws / "run")
    assert main(["eval", "--run", run, "--device", "cpu", "--max-tokens", "64", "--no-progress"]) == 0
    assert "using backend auto instead" in capsys.readouterr().err
    assert main(["sample", "--run", run, "--device", "cpu", "--length", "4", "--out", str(ws / "s")]) == 0
    assert "using backend auto instead" in capsys.readouterr().err
