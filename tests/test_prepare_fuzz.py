"""Fuzzing ``sparse-transformer prepare``: every kind that reads a file is fed
truncated files, random bytes, wrong headers and magic numbers, empty files and a folder where a
file is expected. Each must end in a one-line :class:`UserError` (the CLI prints it and exits 2) or,
for input that is still valid data of the kind (raw text is any bytes), a complete prepare; never
another exception, a multi-line message, a hang or a partial output folder.

In-process for the many cases (with a per-case alarm against hangs); a few through the CLI in a
subprocess with a timeout.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_transformer.data.prepare import prepare
from sparse_transformer.errors import UserError

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TIMEOUT_S = 60  # a prepare of these few-KB inputs takes well under a second; more is a hang


def _text(n=400) -> bytes:
    return bytes((i * 7919) % 26 + 97 if i % 11 else 10 for i in range(n))


def _cifar_tar(path: Path) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps(
                {b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), b"labels": [0] * 5}, protocol=2
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _idx(n: int, rows=4, cols=4) -> bytes:
    return (
        struct.pack(">4i", 0x803, n, rows, cols)
        + bytes(range(256)) * (n * rows * cols // 256)
        + bytes(n * rows * cols % 256)
    )


def _wav(path: Path) -> None:
    import soundfile as sf

    sf.write(path, np.sin(np.arange(4000) / 7.0) * 0.5, 8000)


def _build(case: str, root: Path) -> tuple[str, Path, Path]:
    """A valid input: ``(kind, src for prepare, the file that gets corrupted)``."""
    root.mkdir(parents=True, exist_ok=True)
    if case in ("text", "text-gz", "text-bz2", "text-xz"):
        ext, comp = {
            "text": ("", bytes),
            "text-gz": (".gz", gzip.compress),
            "text-bz2": (".bz2", bz2.compress),
            "text-xz": (".xz", lzma.compress),
        }[case]
        f = root / f"corpus.txt{ext}"
        f.write_bytes(comp(_text()))
        return "text", f, f
    if case == "enwik8-zip":
        f = root / "enwik8.zip"
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("enwik8", _text())
        return "enwik8", f, f
    if case == "cifar10-tar":
        f = root / "cifar-10-python.tar.gz"
        _cifar_tar(f)
        return "cifar10", f, f
    if case == "cifar10-folder":
        d = root / "cifar-10-batches-py"
        d.mkdir()
        _cifar_tar(root / "c.tar.gz")
        with tarfile.open(root / "c.tar.gz") as tar:
            for m in tar:
                (d / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        return "cifar10", root, d / "data_batch_3"
    if case in ("imagenet64-folder", "imagenet64-file"):
        d = root / "in64"
        d.mkdir()
        rng = np.random.default_rng(0)
        np.savez(d / "train_data_batch_1.npz", data=rng.integers(0, 256, (30, 12288), dtype=np.uint8))
        np.savez_compressed(d / "val_data.npz", data=rng.integers(0, 256, (3, 12288), dtype=np.uint8))
        if case == "imagenet64-file":
            return "imagenet64", d / "train_data_batch_1.npz", d / "train_data_batch_1.npz"
        return "imagenet64", d, d / "val_data.npz"
    if case in ("mnist-gz", "mnist-raw"):
        d = root / "mnist"
        d.mkdir()
        gz = case == "mnist-gz"
        for stem, n in (("train-images-idx3-ubyte", 30), ("t10k-images-idx3-ubyte", 4)):
            (d / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(_idx(n)) if gz else _idx(n))
        return "mnist", d, d / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    if case in ("audio-wav", "audio-folder"):
        d = root / "audio"
        d.mkdir()
        for name in ("a.wav", "b.wav", "c.wav"):
            _wav(d / name)
        return ("audio", d / "a.wav", d / "a.wav") if case == "audio-wav" else ("audio", d, d / "b.wav")
    raise AssertionError(case)


CASES = [
    "text",
    "text-gz",
    "text-bz2",
    "text-xz",
    "enwik8-zip",
    "cifar10-tar",
    "cifar10-folder",
    "imagenet64-folder",
    "imagenet64-file",
    "mnist-gz",
    "mnist-raw",
    "audio-wav",
    "audio-folder",
]
# kinds where any bytes are valid data (the corrupted file is still a text or a raw-bytes stream)
ANY_BYTES_OK = {"text"}


def _alarm(signum, frame):
    raise TimeoutError(f"prepare ran longer than {TIMEOUT_S} s on a few KB of input (a hang)")


def _outcome(kind: str, src: Path, out: Path) -> str:
    """``"ok"`` or ``"refused"``; any other exception, a multi-line message or a hang fails the test."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        meta = prepare(kind, src, out, rate=8000, progress=False)
    except UserError as e:
        msg = str(e)
        assert msg.startswith("data: ") and "\n" not in msg and len(msg) < 600, msg
        assert not any(p.name.startswith(".") and "tmp" in p.name for p in out.iterdir()), "temp files left"
        return "refused"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert all(meta["splits"][s] == (out / f"{s}.bin").stat().st_size for s in ("train", "val", "test"))
    return "ok"


def _corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    for i in range(min(16, len(flipped))):
        flipped[i] ^= 0xFF
    zeroed = bytearray(data)
    zeroed[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    return {
        "empty": b"",
        "one-byte": data[:1],
        "truncated-10%": data[: len(data) // 10],
        "truncated-half": data[: len(data) // 2],
        "truncated-last-byte": data[:-1],
        "random-bytes": np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes(),
        "header-flipped": bytes(flipped),
        "zeroed-middle": bytes(zeroed),
        "wrong-magic-text": b"hello, this is not the data you are looking for\n" * 20,
    }


@pytest.mark.parametrize("case", CASES)
def test_valid_input_prepares(tmp_path, case):
    kind, src, _ = _build(case, tmp_path / "src")
    assert _outcome(kind, src, tmp_path / "out") == "ok"


@pytest.mark.parametrize("case", CASES)
def test_corrupted_file_is_refused_with_one_line(tmp_path, case):
    kind, src, target = _build(case, tmp_path / "src")
    original = target.read_bytes()
    outcomes = {}
    for name, data in _corruptions(original).items():
        target.write_bytes(data)
        outcomes[name] = _outcome(kind, src, tmp_path / "out")
    if case not in ANY_BYTES_OK and not case.startswith("audio"):
        # structured formats: nothing that lost its header or its end may pass as data
        for name in ("empty", "one-byte", "truncated-10%", "random-bytes", "header-flipped", "wrong-magic-text"):
            assert outcomes[name] == "refused", (name, outcomes)
    if case.startswith("audio"):  # a wav with a broken header is refused (a short one may still decode)
        for name in ("empty", "one-byte", "random-bytes", "header-flipped", "wrong-magic-text"):
            assert outcomes[name] == "refused", (name, outcomes)


@pytest.mark.parametrize("case", CASES)
def test_folder_where_a_file_is_expected(tmp_path, case):
    kind, src, target = _build(case, tmp_path / "src")
    target.unlink()
    target.mkdir()
    # a folder of tracks skips a subfolder named like a track (two tracks remain); everywhere else a
    # folder in place of a file is refused
    assert _outcome(kind, src, tmp_path / "out") == ("ok" if case == "audio-folder" else "refused")


def test_a_fifo_as_source_is_refused_not_waited_on(tmp_path):
    """A named pipe with no writer: reading it would wait forever (text) or list it as a folder (audio)."""
    os.mkfifo(tmp_path / "fifo")

    def hang(signum, frame):  # not an OSError (as TimeoutError is), which prepare would turn into a refusal
        raise AssertionError("prepare waited on the FIFO")

    old = signal.signal(signal.SIGALRM, hang)
    try:
        for kind in ("text", "enwik8", "cifar10", "imagenet64", "mnist", "fashion-mnist", "audio"):
            signal.alarm(5)
            with pytest.raises(UserError, match="is neither a file nor a folder"):
                prepare(kind, tmp_path / "fifo", tmp_path / "out", progress=False)
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_empty_folder_and_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    for kind in ("text", "enwik8", "cifar10", "imagenet64", "mnist", "fashion-mnist", "audio"):
        assert _outcome(kind, tmp_path / "empty", tmp_path / "out") == "refused", kind
        assert _outcome(kind, tmp_path / "missing", tmp_path / "out") == "refused", kind


@pytest.mark.parametrize("n,rows,cols", [(5, 0, 4), (5, 4, 0), (-1, -1, 16), (-2, 4, -2), (0, 4, 4)])
def test_idx_header_with_nonpositive_counts_is_refused(tmp_path, n, rows, cols):
    d = tmp_path / "mnist"
    d.mkdir()
    pixels = max(n * rows * cols, 0)
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):  # one shape: no mismatch error first
        (d / stem).write_bytes(struct.pack(">4i", 0x803, n, rows, cols) + bytes(pixels))
    assert _outcome("mnist", d, tmp_path / "out") == "refused"


def test_truncated_enwik8_zip_is_not_taken_for_raw_text(tmp_path):
    kind, src, _ = _build("enwik8-zip", tmp_path / "src")
    src.write_bytes(src.read_bytes()[:-30])
    with pytest.raises(UserError, match="not an intact zip archive"):
        prepare(kind, src, tmp_path / "out", progress=False)
    raw = tmp_path / "enwik8"
    raw.write_bytes(_text())
    assert prepare("enwik8", raw, tmp_path / "out", progress=False)["splits"]["train"] == 360


# ---------------------------------------------------------------------------------------------
# random mutations (hypothesis): overwrite, cut and insert bytes anywhere in the file
# ---------------------------------------------------------------------------------------------

_mutation = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.floats(0, 1), st.integers(0, 0)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    ),
    min_size=1,
    max_size=6,
)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, where, arg in ops:
        i = int(where * len(b))
        if op == "set" and b:
            b[min(i, len(b) - 1)] = arg
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = arg
    return bytes(b)


@pytest.mark.parametrize(
    "case",
    [
        "text-gz",
        "text-xz",
        "enwik8-zip",
        "cifar10-tar",
        "cifar10-folder",
        "imagenet64-file",
        "mnist-gz",
        "mnist-raw",
        "audio-wav",
    ],
)
def test_random_mutations_end_in_prepare_or_one_line_error(tmp_path_factory, case):
    root = tmp_path_factory.mktemp(case)
    kind, src, target = _build(case, root / "src")
    original = target.read_bytes()

    @FUZZ
    @given(ops=_mutation)
    def run(ops):
        target.write_bytes(_mutate(original, ops))
        _outcome(kind, src, root / "out")

    run()


@settings(max_examples=25, deadline=None)
@given(blob=st.binary(max_size=600))
def test_random_bytes_as_a_cifar_batch(tmp_path_factory, blob):
    root = tmp_path_factory.mktemp("cifar")
    kind, src, target = _build("cifar10-folder", root / "src")
    target.write_bytes(blob)
    assert _outcome(kind, src, root / "out") == "refused"


# ---------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit status 2, no traceback, no hang
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,corruption",
    [
        ("cifar10-tar", "random-bytes"),
        ("mnist-gz", "truncated-half"),
        ("imagenet64-file", "header-flipped"),
        ("enwik8-zip", "empty"),
    ],
)
def test_cli_prepare_corrupted_input_exits_2_with_one_line(tmp_path, case, corruption):
    kind, src, target = _build(case, tmp_path / "src")
    target.write_bytes(_corruptions(target.read_bytes())[corruption])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_transformer",
            "prepare",
            kind,
            "--src",
            str(src),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data: ") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "meta.json").exists()
