"""Data layer: prepare every kind from small files in the official formats, load, mu-law, errors."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import soundfile as sf
import torch

from sparse_transformer.data import (
    KINDS,
    default_data_dir,
    eval_windows,
    mulaw_decode,
    mulaw_encode,
    open_split,
    prepare,
    read_meta,
    sample_batch,
    write_wav,
)
from sparse_transformer.data.loader import DEFAULT_SOURCE
from sparse_transformer.errors import UserError

# real data where the checkout has it (shared/ beside tests/); random bytes otherwise
FASHION_MNIST = Path(__file__).resolve().parent.parent / "shared" / "data" / "fashion-mnist"


def read_bin(out: Path, split: str) -> np.ndarray:
    return np.fromfile(out / f"{split}.bin", dtype=np.uint8)


def assert_no_temp_files(out: Path) -> None:
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".part-" in p.name]


# ------------------------------------------------------------------------------------------ mu-law


def test_mulaw_roundtrip_and_silence():
    x = np.linspace(-1, 1, 100_001)
    y = mulaw_decode(mulaw_encode(x))
    assert y.dtype == np.float32
    # Rounding moves f by at most half a step (1/255); dx/df = ln(256)/255 * (1 + 255|x|) grows with |x|,
    # so the error is at most 1/255 times that slope at the larger of |x| and |y|.
    bound = np.log(256) / 255 * (1 / 255 + np.maximum(np.abs(x), np.abs(y)))
    assert np.all(np.abs(y - x) <= bound + 1e-6)
    q = np.arange(256, dtype=np.uint8)
    assert np.array_equal(mulaw_encode(mulaw_decode(q)), q)
    assert mulaw_encode(np.zeros(3)).tolist() == [128, 128, 128]
    assert mulaw_encode(np.array([-5.0, 5.0])).tolist() == [0, 255]  # clipped


def test_write_wav(tmp_path):
    q = mulaw_encode(0.5 * np.sin(np.linspace(0, 100, 1200)))
    write_wav(tmp_path / "a.wav", q, 12000)
    pcm, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 12000 and pcm.shape == (1200,)
    assert np.abs(pcm - mulaw_decode(q)).max() < 1e-4


# -------------------------------------------------------------------------------------------- text


def test_embedded_sample_standard_split(tmp_path):
    assert (
        hashlib.sha256(DEFAULT_SOURCE.read_bytes()).hexdigest()
        == "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
    )
    assert (DEFAULT_SOURCE.parent / "LICENSE.md").is_file()
    meta = prepare("text", DEFAULT_SOURCE, tmp_path, progress=False)
    assert meta["splits"] == {"train": 5_480_771, "val": 304_487, "test": 304_488}
    joined = b"".join(read_bin(tmp_path, s).tobytes() for s in ("train", "val", "test"))
    assert hashlib.sha256(joined).hexdigest() == "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"
    assert meta == json.loads((tmp_path / "meta.json").read_text()) == read_meta(tmp_path)
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "name, compress",
    [
        ("t.txt", lambda b: b),
        ("t.txt.bz2", bz2.compress),
        ("t.txt.xz", lzma.compress),
        ("t.txt.gz", gzip.compress),
        ("t.dat", lzma.compress),  # no telling extension: found by magic bytes
    ],
)
def test_text(tmp_path, name, compress):
    raw = bytes(range(256)) * 4 + b"hello"  # 1029 bytes: train 926, val 51, test 52
    (tmp_path / name).write_bytes(compress(raw))
    meta = prepare("text", tmp_path / name, tmp_path / "out", progress=False)
    assert meta["modality"] == "text" and meta["record_len"] is None and meta["shape"] is None
    assert meta["splits"] == {"train": 926, "val": 51, "test": 52}
    out = tmp_path / "out"
    assert read_bin(out, "train").tobytes() + read_bin(out, "val").tobytes() + read_bin(out, "test").tobytes() == raw


def test_text_bad_files(tmp_path):
    (tmp_path / "plain.bz2").write_bytes(b"not compressed at all" * 10)
    with pytest.raises(UserError, match=r"plain\.bz2 ends in \.bz2 but is not bzip2"):
        prepare("text", tmp_path / "plain.bz2", tmp_path / "out", progress=False)
    (tmp_path / "cut.xz").write_bytes(lzma.compress(os.urandom(5000))[:-100])
    with pytest.raises(UserError, match=r"could not read .*cut\.xz"):
        prepare("text", tmp_path / "cut.xz", tmp_path / "out", progress=False)
    (tmp_path / "tiny.txt").write_bytes(b"0123456789")
    with pytest.raises(UserError, match="too small"):
        prepare("text", tmp_path / "tiny.txt", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match=r"missing\.txt does not exist; pass --src"):
        prepare("text", tmp_path / "missing.txt", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="pass --src"):
        prepare("text", None, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="unknown kind"):
        prepare("pdf", tmp_path / "tiny.txt", tmp_path / "out", progress=False)
    assert not any((tmp_path / "out").iterdir())  # failures leave nothing behind


def test_enwik8_zip_and_raw(tmp_path):
    raw = os.urandom(2000)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", raw)
    meta = prepare("enwik8", tmp_path / "enwik8.zip", tmp_path / "a", progress=False)
    assert meta["splits"] == {"train": 1800, "val": 100, "test": 100}
    assert "not the official 100,000,000-byte enwik8" in meta["source"]
    assert read_bin(tmp_path / "a", "test").tobytes() == raw[1900:]
    (tmp_path / "enwik8").write_bytes(raw)
    prepare("enwik8", tmp_path / "enwik8", tmp_path / "b", progress=False)
    for s in ("train", "val", "test"):
        assert np.array_equal(read_bin(tmp_path / "a", s), read_bin(tmp_path / "b", s))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", raw)
    with pytest.raises(UserError, match="no member named enwik8"):
        prepare("enwik8", tmp_path / "other.zip", tmp_path / "c", progress=False)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [("method", 99, "compression method is not supported"), ("flags", 1, "encrypted")],
)
def test_enwik8_zip_member_that_cannot_be_extracted_is_one_line(tmp_path, field, value, reason):
    """A zip whose enwik8 member uses a compression method zipfile lacks, or is encrypted: one
    UserError naming the file, nothing written (found by the mutation fuzzer: a zipfile
    NotImplementedError escaped)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("enwik8", os.urandom(500))
    data = bytearray(buf.getvalue())
    # local file header: flags at +6, method at +8; central directory header: flags at +8, method at +10
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + flags_at + (2 if field == "method" else 0)
        data[at : at + 2] = struct.pack("<H", value)
    (tmp_path / "enwik8.zip").write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"enwik8\.zip's member enwik8 cannot be extracted \(.*{reason}"):
        prepare("enwik8", tmp_path / "enwik8.zip", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("defect", ["version", "utf8-name"])
def test_enwik8_zip_whose_directory_zipfile_cannot_read_is_one_line(tmp_path, defect):
    """A zip whose central directory asks for a zip version zipfile does not implement (6.4), or
    flags a member name as UTF-8 that is not: opening it raises NotImplementedError or
    UnicodeDecodeError, which must end as one UserError naming the file, nothing written (the first
    found by the mutation fuzzer in CI, 2026-12-01)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("enwik8", os.urandom(500))
    data = bytearray(buf.getvalue())
    central = data.index(b"PK\x01\x02")  # central directory header: version needed at +6, flags at +8, name at +46
    if defect == "version":
        data[central + 6 : central + 8] = struct.pack("<H", 64)
    else:
        data[central + 8 : central + 10] = struct.pack("<H", 0x800)
        data[central + 46] = 0xFF
    (tmp_path / "enwik8.zip").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"enwik8\.zip is a zip archive this Python's zipfile cannot read \("):
        prepare("enwik8", tmp_path / "enwik8.zip", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class _FakeResponse(io.BytesIO):
    headers: ClassVar[dict] = {}  # no Content-Length: the progress bar runs without a total


def test_download(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("enwik8", b"x" * 400)
    urls = []
    monkeypatch.setattr(
        "urllib.request.urlopen", lambda url, timeout: urls.append(url) or _FakeResponse(buf.getvalue())
    )
    meta = prepare("enwik8", None, tmp_path, progress=False)
    assert urls == ["http://mattmahoney.net/dc/enwik8.zip"] and (tmp_path / "enwik8.zip").is_file()
    assert meta["splits"] == {"train": 360, "val": 20, "test": 20}

    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(UserError, match=r"could not download https://www\.cs\.toronto\.edu/.*offline.*pass --src PATH"):
        prepare("cifar10", None, tmp_path / "c", progress=False)
    assert_no_temp_files(tmp_path / "c")


def test_failed_prepare_keeps_previous_data(tmp_path):
    (tmp_path / "good.txt").write_bytes(os.urandom(1000))
    prepare("text", tmp_path / "good.txt", tmp_path / "out", progress=False)
    before = {s: read_bin(tmp_path / "out", s) for s in ("train", "val", "test")}
    (tmp_path / "bad.gz").write_bytes(gzip.compress(os.urandom(3000))[:200])
    with pytest.raises(UserError):
        prepare("text", tmp_path / "bad.gz", tmp_path / "out", progress=False)
    read_meta(tmp_path / "out")
    for s, data in before.items():
        assert np.array_equal(read_bin(tmp_path / "out", s), data)
    assert_no_temp_files(tmp_path / "out")


# ------------------------------------------------------------------------------------------ images


def cifar_batch(data: np.ndarray) -> bytes:
    """A batch pickled like the official files: dict with bytes keys, data uint8 [N, 3072] planar."""
    d = {b"batch_label": b"batch", b"labels": [0] * len(data), b"data": data, b"filenames": [b"x.png"] * len(data)}
    return pickle.dumps(d, protocol=2)


@pytest.fixture
def cifar(tmp_path):
    """(tar.gz path, folder path, train planes [50, 3072], test planes [7, 3072])."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    blobs = {f"data_batch_{i + 1}": cifar_batch(train[10 * i : 10 * i + 10]) for i in range(5)}
    blobs["test_batch"] = cifar_batch(test)
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, blob in blobs.items():
            (folder / name).write_bytes(blob)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return tmp_path / "cifar-10-python.tar.gz", folder, train, test


def test_cifar10_layout(tmp_path, cifar):
    tgz, folder, train, test = cifar
    meta = prepare("cifar10", tgz, tmp_path / "a", progress=False)
    assert meta["modality"] == "image" and meta["record_len"] == 3072 and meta["shape"] == [32, 32, 3]
    # val = last min(2000, 50 // 25) = 2 training images
    assert meta["splits"] == {"train": 48 * 3072, "val": 2 * 3072, "test": 7 * 3072}
    out = read_bin(tmp_path / "a", "train").reshape(48, 3072)
    k, r, c = 5, 3, 17  # image 5, pixel (row 3, column 17): its R, G, B come from the three planes
    assert out[k, (r * 32 + c) * 3 : (r * 32 + c) * 3 + 3].tolist() == [
        train[k, p * 1024 + r * 32 + c] for p in range(3)
    ]
    assert np.array_equal(out.reshape(48, 32, 32, 3), train[:48].reshape(48, 3, 32, 32).transpose(0, 2, 3, 1))
    val = read_bin(tmp_path / "a", "val").reshape(2, 32, 32, 3)
    assert np.array_equal(val, train[48:].reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    assert read_bin(tmp_path / "a", "test")[:3].tolist() == [test[0, 0], test[0, 1024], test[0, 2048]]
    # the extracted folder (or its parent) gives the same bytes
    for src in (folder, folder.parent):
        prepare("cifar10", src, tmp_path / "b", progress=False)
        for s in ("train", "val", "test"):
            assert np.array_equal(read_bin(tmp_path / "a", s), read_bin(tmp_path / "b", s))


def test_cifar10_bad_inputs(tmp_path, cifar):
    _, folder, train, _ = cifar
    (folder / "data_batch_3").write_bytes(cifar_batch(train[:10, :3000]))
    with pytest.raises(
        UserError, match=r"data_batch_3 holds 30000 pixel bytes, not a multiple of 3072 \(truncated record\)"
    ):
        prepare("cifar10", folder, tmp_path / "o", progress=False)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"labels": [1, 2]}, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_3 has no uint8 array under b'data'"):
        prepare("cifar10", folder, tmp_path / "o", progress=False)
    (folder / "data_batch_3").write_bytes(pickle.dumps(print, protocol=2))  # any callable: code execution
    with pytest.raises(
        UserError, match=r"data_batch_3 is not a CIFAR-10 python batch \(refusing to load (__)?builtin(s|__)\.print\)"
    ):
        prepare("cifar10", folder, tmp_path / "o", progress=False)
    (folder / "test_batch").unlink()
    with pytest.raises(UserError, match="lacks test_batch"):
        prepare("cifar10", folder, tmp_path / "o", progress=False)
    (tmp_path / "cut.tar.gz").write_bytes((tmp_path / "cifar-10-python.tar.gz").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"cut\.tar\.gz"):
        prepare("cifar10", tmp_path / "cut.tar.gz", tmp_path / "o", progress=False)


def test_imagenet64(tmp_path):
    rng = np.random.default_rng(1)
    batches = {i: rng.integers(0, 256, (10, 12288), dtype=np.uint8) for i in (1, 2, 10)}
    for i, data in batches.items():
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=data, labels=np.arange(10))
    val = rng.integers(0, 256, (4, 12288), dtype=np.uint8)
    np.savez(tmp_path / "val_data.npz", data=val, labels=np.arange(4))
    meta = prepare("imagenet64", tmp_path, tmp_path / "out", progress=False)
    assert meta["record_len"] == 12288 and meta["shape"] == [64, 64, 3]
    assert meta["splits"] == {"train": 29 * 12288, "val": 12288, "test": 4 * 12288}  # val = 30 // 25 = 1
    train = read_bin(tmp_path / "out", "train").reshape(29, 64, 64, 3)
    k, r, c = 12, 40, 7  # image 12 = batch 2's third image (batches sorted by number: 1, 2, 10)
    assert train[k, r, c].tolist() == [batches[2][2, p * 4096 + r * 64 + c] for p in range(3)]
    assert np.array_equal(
        read_bin(tmp_path / "out", "val"), batches[10][-1].reshape(3, 64, 64).transpose(1, 2, 0).ravel()
    )
    assert np.array_equal(
        read_bin(tmp_path / "out", "test").reshape(4, 64, 64, 3), val.reshape(4, 3, 64, 64).transpose(0, 2, 3, 1)
    )

    # one file of 10 images: min(10000, 10 // 25) = 0 held out, so it is refused as too small
    with pytest.raises(UserError, match=r"train_data_batch_1\.npz is too small: its val split came out empty"):
        prepare("imagenet64", tmp_path / "train_data_batch_1.npz", tmp_path / "one", progress=False)

    np.savez(tmp_path / "nodata.npz", x=val)
    with pytest.raises(UserError, match=r"nodata\.npz has no array named 'data'"):
        prepare("imagenet64", tmp_path / "nodata.npz", tmp_path / "bad", progress=False)
    np.savez(tmp_path / "small.npz", data=val[:, :3072])
    with pytest.raises(UserError, match=r"expected uint8 \[N, 12288\]"):
        prepare("imagenet64", tmp_path / "small.npz", tmp_path / "bad", progress=False)
    np.savez(tmp_path / "objects.npz", data=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=r"could not read .*objects\.npz"):
        prepare("imagenet64", tmp_path / "objects.npz", tmp_path / "bad", progress=False)


def test_imagenet64_single_file_split(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (60, 12288), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", data=data)
    meta = prepare("imagenet64", tmp_path / "one.npz", tmp_path / "out", progress=False)
    assert meta["splits"] == {"train": 56 * 12288, "val": 2 * 12288, "test": 2 * 12288}
    assert np.array_equal(read_bin(tmp_path / "out", "test")[:3], data[-2, [0, 4096, 8192]])


def write_idx(path: Path, images: np.ndarray, magic: int = 0x803) -> None:
    n, rows, cols = images.shape
    path.write_bytes(gzip.compress(struct.pack(">4i", magic, n, rows, cols) + images.tobytes()))


def idx_images(name: str, n: int) -> np.ndarray:
    """The first n images of a real Fashion-MNIST file, or random ones where the data is absent."""
    path = FASHION_MNIST / name
    if path.is_file():
        with gzip.open(path) as f:
            return np.frombuffer(f.read(16 + n * 784)[16:], np.uint8).reshape(n, 28, 28)
    return np.random.default_rng(3).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_fashion_mnist(tmp_path):
    train, test = idx_images("train-images-idx3-ubyte.gz", 300), idx_images("t10k-images-idx3-ubyte.gz", 100)
    src = tmp_path / "fm"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte.gz", train)
    write_idx(src / "t10k-images-idx3-ubyte.gz", test)
    meta = prepare("fashion-mnist", src, tmp_path / "out", progress=False)
    assert meta["record_len"] == 784 and meta["shape"] == [28, 28, 1]
    assert meta["splits"] == {"train": 288 * 784, "val": 12 * 784, "test": 100 * 784}  # val = 300 // 25
    assert np.array_equal(read_bin(tmp_path / "out", "train").reshape(288, 28, 28), train[:288])
    assert np.array_equal(read_bin(tmp_path / "out", "val").reshape(12, 28, 28), train[288:])
    assert np.array_equal(read_bin(tmp_path / "out", "test").reshape(100, 28, 28), test)

    write_idx(src / "train-images-idx3-ubyte.gz", train, magic=0x801)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz has idx magic 0x00000801, not 0x00000803"):
        prepare("mnist", src, tmp_path / "bad", progress=False)
    (src / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">4i", 0x803, 300, 28, 28) + train.tobytes()[:-5])
    )
    with pytest.raises(UserError, match="truncated"):
        prepare("mnist", src, tmp_path / "bad", progress=False)
    write_idx(src / "train-images-idx3-ubyte.gz", train)
    (src / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(UserError, match="has no t10k-images-idx3-ubyte.gz"):
        prepare("mnist", src, tmp_path / "bad", progress=False)


# ------------------------------------------------------------------------------------------- audio


def tone(seconds: float, sr: int = 44100, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_audio_tracks(tmp_path):
    src = tmp_path / "music"
    src.mkdir()
    sf.write(src / "a.wav", tone(1.0), 44100)
    sf.write(src / "b.ogg", tone(0.5, channels=2, seed=1), 44100)  # stereo Ogg Vorbis
    sf.write(src / "c.wav", np.zeros(22050), 44100, subtype="PCM_16")
    (src / "notes.txt").write_text("ignored")
    meta = prepare("audio", src, tmp_path / "out", progress=False)
    assert meta["modality"] == "audio" and meta["sample_rate"] == 12000 and meta["record_len"] is None
    # 3 tracks sorted by name: a -> train, b -> val, c -> test (whole tracks held out)
    assert meta["splits"]["train"] == 12000  # 44,100 samples * 40/147
    assert abs(meta["splits"]["val"] - 6000) <= 10
    assert "val = b.ogg; test = c.wav" in meta["source"]
    assert set(read_bin(tmp_path / "out", "test").tolist()) == {128}  # silence
    x = mulaw_decode(read_bin(tmp_path / "out", "train"))
    assert 0.25 < np.abs(x).max() < 0.6  # the tone survived resampling, mono, no clipping

    meta = prepare("audio", src / "a.wav", tmp_path / "one", rate=8000, progress=False)
    assert sum(meta["splits"].values()) == 8000
    assert "split 90/5/5 by bytes" in meta["source"]


def test_audio_explicit_split_and_bad_file(tmp_path):
    for split, seconds in (("train", 0.3), ("val", 0.2), ("test", 0.1)):
        (tmp_path / split).mkdir()
        sf.write(tmp_path / split / f"{split}.flac", tone(seconds), 44100)
    meta = prepare("audio", tmp_path, tmp_path / "out", progress=False)
    assert meta["splits"] == {"train": 3600, "val": 2400, "test": 1200}

    (tmp_path / "train" / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(UserError, match=r"cannot decode audio file .*broken\.wav"):
        prepare("audio", tmp_path, tmp_path / "out2", progress=False)
    with pytest.raises(UserError, match="has no .wav/.flac/.ogg files"):
        prepare("audio", tmp_path / "out", tmp_path / "out3", progress=False)


# ------------------------------------------------------------------------------------------ loader


@pytest.fixture
def text_dir(tmp_path):
    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 40)  # 10,240 bytes: 9216 / 512 / 512
    prepare("text", tmp_path / "t.txt", tmp_path / "d", progress=False)
    return tmp_path / "d"


def test_open_split_and_sample_batch(text_dir):
    train = open_split(text_dir, "train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint8 and len(train) == 9216
    with pytest.raises(ValueError):
        train[0] = 1  # read-only
    x = sample_batch(train, 4, 100, np.random.default_rng(0))
    assert x.shape == (4, 100) and x.dtype == torch.int64
    assert torch.all((x[:, 1:] - x[:, :-1]) % 256 == 1)  # each row is a contiguous window of the file
    a = sample_batch(train, 4, 100, np.random.default_rng(7))
    assert torch.equal(a, sample_batch(train, 4, 100, np.random.default_rng(7)))  # the rng decides
    with pytest.raises(UserError, match=r"fewer than seq_len 1024; use a smaller --data.seq_len"):
        sample_batch(open_split(text_dir, "val"), 2, 1024, np.random.default_rng(0))
    with pytest.raises(UserError, match="unknown split"):
        open_split(text_dir, "dev")


def test_sample_batch_records():
    data = np.repeat(np.arange(10, dtype=np.uint8), 12)  # 10 records of 12 bytes, record k = all k
    rng = np.random.default_rng(0)
    x = sample_batch(data, 64, 12, rng, record_len=12)
    assert torch.all(x == x[:, :1])  # a window is exactly one record
    x = sample_batch(np.arange(120, dtype=np.uint8), 64, 4, rng, record_len=12)
    assert torch.all(x[:, 0] % 4 == 0)  # aligned chunks, never across a record boundary
    with pytest.raises(UserError, match="must equal the record length 12 .* or divide it"):
        sample_batch(data, 2, 5, rng, record_len=12)


def test_eval_windows():
    w = eval_windows(10, 4)
    assert w == [(0, 4), (4, 4), (8, 2)]
    covered = np.zeros(1000, int)
    for s, n in eval_windows(1000, 64):
        covered[s : s + n] += 1
    assert np.all(covered == 1)
    assert eval_windows(24, 6, record_len=12) == [(0, 6), (6, 6), (12, 6), (18, 6)]
    with pytest.raises(UserError):
        eval_windows(24, 5, record_len=12)


def test_read_meta_errors(tmp_path, text_dir):
    with pytest.raises(UserError, match=r"meta\.json is missing; run `sparse-transformer prepare"):
        read_meta(tmp_path / "nothing")
    with open(text_dir / "val.bin", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match=r"val\.bin has 513 bytes but meta\.json says 512 .*prepare text"):
        read_meta(text_dir)
    (text_dir / "val.bin").unlink()
    with pytest.raises(UserError, match=r"val\.bin is missing"):
        open_split(text_dir, "train")
    (text_dir / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        read_meta(text_dir)


def test_read_meta_record_len(tmp_path, cifar):
    prepare("cifar10", cifar[0], tmp_path / "c", progress=False)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    with open(tmp_path / "c" / "test.bin", "ab") as f:
        f.write(b"123")
    meta["splits"]["test"] += 3
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not a multiple of record_len 3072"):
        read_meta(tmp_path / "c")


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = default_data_dir()
    assert d == tmp_path / "sparse-transformer" / "enwiki-sample"
    assert read_meta(d)["splits"] == {"train": 5_480_771, "val": 304_487, "test": 304_488}
    stamp = (d / "train.bin").stat().st_mtime_ns
    assert default_data_dir() == d and (d / "train.bin").stat().st_mtime_ns == stamp  # cached
    with open(d / "train.bin", "r+b") as f:  # corrupt the cache: it is prepared again
        f.truncate(1000)
    assert read_meta(default_data_dir())["splits"]["train"] == 5_480_771
    assert sorted(p.name for p in d.parent.iterdir()) == ["enwiki-sample"]  # no temporary folders left


def test_kinds(tmp_path):
    """The paper's data sets are among the kinds; the CLI offers exactly KINDS; prepare() knows each
    of them (a missing source names what to pass for that kind) and refuses any other."""
    from sparse_transformer.cli import build_parser

    assert {"enwik8", "cifar10", "imagenet64", "audio"} <= set(KINDS)
    parser = build_parser()
    assert [parser.parse_args(["prepare", k, "--out", "x"]).kind for k in KINDS] == list(KINDS)
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "bogus", "--out", "x"])
    for kind in KINDS:
        with pytest.raises(UserError, match="does not exist; pass --src with"):
            prepare(kind, tmp_path / "missing", tmp_path / kind, progress=False)
    with pytest.raises(UserError, match="unknown kind 'bogus'"):
        prepare("bogus", tmp_path / "missing", tmp_path / "bogus", progress=False)


def test_audio_without_its_extra_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "a.wav").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "soundfile", None)  # as if the `audio` extra were not installed
    with pytest.raises(UserError, match=r"needs soundfile and scipy .*pip install 'sparse-transformer\[audio\]'"):
        prepare("audio", tmp_path, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").iterdir())  # nothing written
