"""Raw data -> ``train.bin``, ``val.bin``, ``test.bin`` (flat uint8) and ``meta.json``.

One byte is one token for every modality (vocabulary 256):

* text (``enwik8``, ``text``): the file's bytes. Split 90/5/5 in file order: train = floor(0.9 n),
  val = floor(0.05 n), test = the rest (for the real enwik8 that is the standard 90M / 5M / 5M).
* images (``cifar10``, ``imagenet64``, ``mnist``, ``fashion-mnist``): each image becomes
  H*W*C bytes in raster order with the channel fastest (pixel (0,0) R G B, pixel (0,1) R G B, ...).
  Validation = the last min(cap, N // 25) training images (cap 2,000 for CIFAR-10 and MNIST, which
  gives the paper's 48,000 / 2,000 CIFAR split; 10,000 for ImageNet64); test = the official test set
  (for ImageNet64 the official validation set, which is what the paper reports on).
* ``audio``: mono, resampled to ``rate`` Hz, 8-bit mu-law (see ``mulaw.py``); whole tracks are
  held out (rule in :func:`_audio_plan`).

Files are written under temporary names and renamed into place only when everything succeeded, and
meta.json (removed first, written last) always describes the .bin files beside it, so an
interrupted prepare never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import bz2
import gzip
import http.client
import io
import json
import lzma
import os
import pickle
import re
import struct
import tarfile
import urllib.request
import zipfile
import zlib
from functools import partial
from math import gcd
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..paths import atomic_output
from ..runfolder import temporary_name
from .format import FORMAT_VERSION, META_KEYS, SPLITS
from .mulaw import mulaw_encode

KINDS = ("enwik8", "text", "cifar10", "imagenet64", "mnist", "fashion-mnist", "audio")
DOWNLOADS = {
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}
EXPECTS = {  # what --src should be, for error messages
    "enwik8": "enwik8.zip or the raw enwik8 file (or leave --src out to download it)",
    "text": "a text file (.gz, .bz2 or .xz are decompressed)",
    "cifar10": "cifar-10-python.tar.gz or its extracted folder (or leave --src out to download it)",
    "imagenet64": "a folder of train_data_batch_*.npz and val_data.npz, or one such .npz",
    "mnist": "a folder with train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz",
    "fashion-mnist": "a folder with train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz",
    "audio": "a wav/flac/ogg file or a folder of them",
}
CHUNK = 1 << 22
# Errors a truncated or corrupt archive / compressed stream raises while being read.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, tarfile.TarError, zipfile.BadZipFile)


def _reason(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a UserError message: its text with every run of
    whitespace (newlines included: tarfile and pickle write several lines) made one space, cut to
    ``limit`` characters; the exception's type name when it has no text (e.g. MemoryError)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bar(progress: bool, **kwargs) -> tqdm:
    return tqdm(disable=None if progress else True, unit_scale=True, leave=False, **kwargs)  # None: off when not a TTY


class _SplitWriter:
    """Collects the three splits in temporary files in ``out``; :meth:`commit` renames them into place.

    On any error (or Ctrl-C) before the commit, the temporary files are deleted and whatever was under
    the final names stays untouched.
    """

    def __init__(self, out: Path):
        self.out = out
        self.tmp = {s: temporary_name(out / f"{s}.bin") for s in SPLITS}

    def __enter__(self):
        # open for the writer's lifetime (closed in __exit__): splits are appended to and moved between
        self.files = {s: open(p, "w+b") for s, p in self.tmp.items()}  # noqa: SIM115
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        for p in self.tmp.values():
            p.unlink(missing_ok=True)

    def write(self, split: str, data) -> None:
        self._put(split, np.ascontiguousarray(data, dtype=np.uint8).data if isinstance(data, np.ndarray) else data)

    def _put(self, split: str, data) -> None:
        """Write to a split's temporary file; a write error (a full disk) is the output's, not the
        source's, and says so (the callers turn read errors of the source into their own message)."""
        try:
            self.files[split].write(data)
        except OSError as e:
            raise UserError(
                f"data: cannot write into {self.out} ({_reason(e)}); free some space or pass another --out"
            ) from None

    def copy_stream(self, split: str, f, bar: tqdm | None = None) -> None:
        while chunk := f.read(CHUNK):
            self._put(split, chunk)
            if bar is not None:
                bar.update(len(chunk))

    def sizes(self) -> dict[str, int]:
        return {s: f.tell() for s, f in self.files.items()}

    def move_tail(self, src: str, n_bytes: int, dst: str) -> None:
        """Move the last ``n_bytes`` of split ``src`` to the end of split ``dst`` (used to carve
        val/test off a stream whose length is only known once it has been written)."""
        f = self.files[src]
        keep = f.tell() - n_bytes
        f.seek(keep)
        self.copy_stream(dst, f)
        f.truncate(keep)
        f.seek(keep)

    def commit(self, meta: dict) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        meta_path = self.out / "meta.json"
        meta_path.unlink(missing_ok=True)  # never let an old meta.json describe new .bin files
        for s, p in self.tmp.items():
            os.replace(p, self.out / f"{s}.bin")
        with atomic_output(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")


def _split_90_5_5(w: _SplitWriter) -> tuple[int, int, int]:
    """Split the stream written to ``train`` into 90/5/5 by bytes, in order (exact integer floors)."""
    n = w.sizes()["train"]
    n_train, n_val = n * 9 // 10, n // 20
    n_test = n - n_train - n_val
    w.move_tail("train", n_val + n_test, "val")
    w.move_tail("val", n_test, "test")
    return n_train, n_val, n_test


def _hold_out_tail(w: _SplitWriter, record_len: int, cap: int) -> tuple[int, int]:
    """Move the last min(cap, N // 25) training records to ``val``; returns (n_train, n_val)."""
    n = w.sizes()["train"] // record_len
    n_val = min(cap, n // 25)
    w.move_tail("train", n_val * record_len, "val")
    return n - n_val, n_val


# ---------------------------------------------------------------------------------------------- text

_COMPRESSED = (  # (name, magic bytes, file extension, opener)
    ("gzip", b"\x1f\x8b\x08", ".gz", gzip.open),
    ("bzip2", b"BZh", ".bz2", bz2.open),
    ("xz", b"\xfd7zXZ\x00", ".xz", lzma.open),
)


def _open_text(path: Path) -> tuple[io.BufferedIOBase, str | None]:
    """Open a file for reading its (decompressed) bytes; the codec is found from its magic bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    for name, magic, _ext, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(path, "rb"), name
    for name, _magic, ext, _opener in _COMPRESSED:
        if path.suffix.lower() == ext:
            raise UserError(
                f"data: {path} ends in {ext} but is not {name} data (truncated or misnamed?); pass the original file"
            )
    return open(path, "rb"), None


def _looks_like_zip(path: Path) -> bool:
    """Whether ``path`` claims to be a zip archive: a ``.zip`` name or the local-file magic ``PK\\x03\\x04``
    (an empty archive's ``PK\\x05\\x06`` too). A directory or unreadable file does not."""
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False


def _prepare_text(kind: str, src: Path, w: _SplitWriter, progress: bool, **_) -> dict:
    codec = None
    try:
        if kind == "enwik8" and not zipfile.is_zipfile(src) and _looks_like_zip(src):
            raise UserError(
                f"data: {src} is not an intact zip archive (truncated or corrupt?); pass the official enwik8.zip "
                "or the raw enwik8 file"
            )
        if kind == "enwik8" and zipfile.is_zipfile(src):
            try:
                archive = zipfile.ZipFile(src)
            except (NotImplementedError, UnicodeDecodeError) as e:  # a newer zip version; a bad UTF-8 name
                raise UserError(
                    f"data: {src} is a zip archive this Python's zipfile cannot read ({_reason(e)}); pass the "
                    "official enwik8.zip or the raw enwik8 file"
                ) from None
            with archive as z:
                if "enwik8" not in z.namelist():
                    raise UserError(
                        f"data: {src} has no member named enwik8; pass the official enwik8.zip or the raw enwik8 file"
                    )
                try:
                    member = z.open("enwik8")
                except (NotImplementedError, RuntimeError) as e:  # zipfile: a compression method it lacks, encryption
                    raise UserError(
                        f"data: {src}'s member enwik8 cannot be extracted ({_reason(e)}); pass the official "
                        "enwik8.zip (deflate) or the raw enwik8 file"
                    ) from None
                with member as f, _bar(progress, total=z.getinfo("enwik8").file_size, unit="B", desc="enwik8") as bar:
                    w.copy_stream("train", f, bar)
            codec = "zip"
        else:
            f, codec = _open_text(src)
            with f, _bar(progress, total=None if codec else src.stat().st_size, unit="B", desc=src.name) as bar:
                w.copy_stream("train", f, bar)
    except READ_ERRORS as e:
        raise UserError(f"data: could not read {src} ({_reason(e)}); pass an intact {EXPECTS[kind]}") from None
    n_train, n_val, n_test = _split_90_5_5(w)
    n = n_train + n_val + n_test
    origin = f"{kind} from {src}" + (f" ({codec})" if codec else "") + f": {n:,} bytes"
    if kind == "enwik8" and n == 100_000_000:
        rule = "the standard enwik8 split 90M / 5M / 5M"
    else:
        rule = "split 90/5/5 by bytes in file order (train = floor(0.9 n), val = floor(0.05 n), test = rest)"
        if kind == "enwik8":
            rule = "not the official 100,000,000-byte enwik8, so " + rule
    return {"modality": "text", "record_len": None, "shape": None, "sample_rate": None, "source": f"{origin}, {rule}"}


# -------------------------------------------------------------------------------------------- images


def _raster(planes: np.ndarray, channels: int, side: int) -> np.ndarray:
    """[N, C*H*W] channel-major (all R, then G, then B) -> [N, H*W*C] raster order, channel fastest."""
    n = planes.shape[0]
    return planes.reshape(n, channels, side, side).transpose(0, 2, 3, 1).reshape(n, -1)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, bytes, str, int, numpy uint8 arrays),
    so a malicious file cannot run code: every global outside this list is refused."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
            ("builtins", "bytes"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_NAMES = CIFAR_TRAIN + ("test_batch",)


def _cifar_blobs(src: Path) -> dict[str, bytes]:
    """The six pickled batches, from cifar-10-python.tar.gz or its (parent) folder."""
    blobs = {}
    if src.is_dir():
        root = src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src
        blobs = {name: (root / name).read_bytes() for name in CIFAR_NAMES if (root / name).is_file()}
        where = root
    else:
        try:
            with tarfile.open(src, "r:*") as tar:
                for member in tar:  # read members in memory: nothing is extracted to disk
                    name = PurePosixPath(member.name).name
                    if name in CIFAR_NAMES and member.isfile():
                        blobs[name] = tar.extractfile(member).read()
        except READ_ERRORS as e:
            raise UserError(
                f"data: could not read {src} as a tar archive ({_reason(e)}); pass an intact {EXPECTS['cifar10']}"
            ) from None
        where = src
    missing = [n for n in CIFAR_NAMES if n not in blobs]
    if missing:
        raise UserError(f"data: {where} lacks {', '.join(missing)}; pass {EXPECTS['cifar10']}")
    return blobs


def _cifar_images(blob: bytes, where: str) -> np.ndarray:
    """One pickled CIFAR-10 batch -> uint8 [N, 3072] in raster order, channel fastest."""
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise nearly anything (OverflowError, LookupError,
        # MemoryError, SystemError from numpy's reconstruction, ...); the restricted unpickler runs no code
        raise UserError(
            f"data: {where} is not a CIFAR-10 python batch ({_reason(e)}); pass {EXPECTS['cifar10']}"
        ) from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise UserError(f"data: {where} has no uint8 array under b'data'; pass {EXPECTS['cifar10']}")
    if data.size % 3072:
        raise UserError(
            f"data: {where} holds {data.size} pixel bytes, not a multiple of 3072 (truncated record); pass an intact {EXPECTS['cifar10']}"
        )
    return _raster(data.reshape(-1, 3072), 3, 32)


def _prepare_cifar10(src: Path, w: _SplitWriter, **_) -> dict:
    blobs = _cifar_blobs(src)
    for name in CIFAR_TRAIN:
        w.write("train", _cifar_images(blobs[name], f"{src}: {name}"))
    w.write("test", _cifar_images(blobs["test_batch"], f"{src}: test_batch"))
    n_train, n_val = _hold_out_tail(w, 3072, cap=2000)
    n_test = w.sizes()["test"] // 3072
    source = (
        f"cifar10 from {src}: train = first {n_train:,} images of data_batch_1..5, val = last {n_val:,} "
        f"(min(2000, N // 25)), test = test_batch ({n_test:,}); 32x32x3 bytes, raster order, channel fastest"
    )
    return {"modality": "image", "record_len": 3072, "shape": [32, 32, 3], "sample_rate": None, "source": source}


def _npz_images(path: Path) -> np.ndarray:
    """One downsampled-ImageNet .npz batch -> uint8 [N, 12288] in raster order, channel fastest."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = z["data"] if "data" in z.files else None
    except (*READ_ERRORS, ValueError) as e:  # ValueError: not an npz, or an object array
        raise UserError(f"data: could not read {path} as .npz ({_reason(e)}); pass {EXPECTS['imagenet64']}") from None
    if data is None:
        raise UserError(
            f"data: {path} has no array named 'data'; pass the official downsampled-ImageNet 64x64 .npz files"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 12288:
        raise UserError(
            f"data: {path} 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 12288] (64x64x3); pass the 64x64 files"
        )
    return _raster(data, 3, 64)


def _batch_number(path: Path) -> int:
    return int(re.search(r"(\d+)\.npz$", path.name).group(1))


def _prepare_imagenet64(src: Path, w: _SplitWriter, progress: bool, **_) -> dict:
    info = {"modality": "image", "record_len": 12288, "shape": [64, 64, 3], "sample_rate": None}
    if src.is_file():
        w.write("train", _npz_images(src))
        n = w.sizes()["train"] // 12288
        n_hold = min(10000, n // 25)
        w.move_tail("train", 2 * n_hold * 12288, "val")
        w.move_tail("val", n_hold * 12288, "test")
        info["source"] = (
            f"imagenet64 from the single file {src}: train = first {n - 2 * n_hold:,} images, val and test = "
            f"the last two shares of min(10000, N // 25) = {n_hold:,} images each; raster order, channel fastest"
        )
        return info
    train = sorted(src.glob("train_data_batch_*.npz"), key=_batch_number)
    test = src / "val_data.npz"
    if not train or not test.is_file():
        raise UserError(f"data: {src} lacks train_data_batch_*.npz or val_data.npz; pass {EXPECTS['imagenet64']}")
    for path in tqdm(train, desc="imagenet64", disable=None if progress else True, leave=False):
        w.write("train", _npz_images(path))
    w.write("test", _npz_images(test))
    n_train, n_val = _hold_out_tail(w, 12288, cap=10000)
    info["source"] = (
        f"imagenet64 from {src}: train = first {n_train:,} images of {len(train)} train_data_batch files, "
        f"val = last {n_val:,} (min(10000, N // 25)), test = val_data.npz ({w.sizes()['test'] // 12288:,}, the official "
        f"validation set); raster order, channel fastest"
    )
    return info


def _idx_images(path: Path) -> tuple[np.ndarray, int, int]:
    """An idx3 image file (gzipped or not) -> (uint8 [N, rows*cols], rows, cols)."""
    try:
        with _open_text(path)[0] as f:
            raw = f.read()
    except READ_ERRORS as e:
        raise UserError(f"data: could not read {path} ({_reason(e)}); pass intact idx files") from None
    if len(raw) < 16:
        raise UserError(f"data: {path} is too short for an idx header (truncated); pass intact idx files")
    magic, n, rows, cols = struct.unpack(">4i", raw[:16])
    if magic == 0x803 and (n < 0 or rows <= 0 or cols <= 0):
        raise UserError(
            f"data: {path} has an idx header of {n} images of {rows} x {cols} pixels (corrupt: counts must be "
            "positive); pass intact idx files"
        )
    if magic != 0x803:
        raise UserError(
            f"data: {path} has idx magic {magic:#010x}, not 0x00000803 (an image file); pass the *-images-idx3-ubyte.gz files"
        )
    if len(raw) != 16 + n * rows * cols:
        raise UserError(
            f"data: {path} has {len(raw) - 16} pixel bytes, header says {n} x {rows} x {cols} (truncated); pass intact idx files"
        )
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows * cols), rows, cols


def _prepare_mnist(kind: str, src: Path, w: _SplitWriter, **_) -> dict:
    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (src / name).is_file():
                return src / name
        raise UserError(f"data: {src} has no {stem}.gz; pass {EXPECTS[kind]}")

    if not src.is_dir():
        raise UserError(f"data: {src} is not a folder; pass {EXPECTS[kind]}")
    train, rows, cols = _idx_images(find("train-images-idx3-ubyte"))
    test, t_rows, t_cols = _idx_images(find("t10k-images-idx3-ubyte"))
    if (rows, cols) != (t_rows, t_cols):
        raise UserError(
            f"data: {src} train images are {rows}x{cols} but test images {t_rows}x{t_cols}; pass one data set's files"
        )
    w.write("train", train)
    w.write("test", test)
    n_train, n_val = _hold_out_tail(w, rows * cols, cap=2000)
    source = (
        f"{kind} from {src}: train = first {n_train:,} train-images, val = last {n_val:,} (min(2000, N // 25)), "
        f"test = t10k-images ({len(test):,}); {rows}x{cols} gray, raster order"
    )
    return {
        "modality": "image",
        "record_len": rows * cols,
        "shape": [rows, cols, 1],
        "sample_rate": None,
        "source": source,
    }


# --------------------------------------------------------------------------------------------- audio

AUDIO_EXTS = (".wav", ".flac", ".ogg")


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTS)


def _audio_plan(src: Path) -> tuple[dict[str, list[Path]] | None, list[Path], str]:
    """Which tracks go to which split: (plan or None for a 90/5/5 byte split, all tracks, rule).

    * a folder with ``train/``, ``val/`` and ``test/`` subfolders: those define the split;
    * 3 or more tracks: sorted by name, the last max(2, round(0.15 n)) are held out, the first of
      them is val and the rest test, so whole recordings are held out;
    * 1 or 2 tracks: their concatenation is split 90/5/5 by bytes.
    """
    if src.is_dir() and all((src / s).is_dir() for s in SPLITS):
        plan = {s: _audio_files(src / s) for s in SPLITS}
        empty = [s for s in SPLITS if not plan[s]]
        if empty:
            raise UserError(
                f"data: {src}/{empty[0]} has no {'/'.join(AUDIO_EXTS)} files; put at least one track in each split folder"
            )
        return plan, [p for s in SPLITS for p in plan[s]], "whole tracks, split by the train/ val/ test/ folders"
    files = [src] if src.is_file() else _audio_files(src)
    if not files:
        raise UserError(f"data: {src} has no {'/'.join(AUDIO_EXTS)} files; pass {EXPECTS['audio']}")
    n = len(files)
    if n < 3:
        return (
            None,
            files,
            f"only {n} track(s), so their concatenation is split 90/5/5 by bytes (no held-out recording)",
        )
    n_hold = max(2, round(0.15 * n))
    plan = {"train": files[: n - n_hold], "val": files[n - n_hold : n - n_hold + 1], "test": files[n - n_hold + 1 :]}
    names = {s: ", ".join(p.name for p in plan[s]) for s in ("val", "test")}
    return (
        plan,
        files,
        f"{n} tracks sorted by name, whole tracks held out: val = {names['val']}; test = {names['test']}",
    )


def _audio_modules():
    """``(soundfile, scipy.signal.resample_poly)``: audio-only dependencies (the ``audio`` extra),
    imported when audio is prepared; UserError with the install command when they are missing."""
    try:
        import soundfile
        from scipy.signal import resample_poly
    except ImportError as e:
        raise UserError(
            f"data: preparing audio needs soundfile and scipy ({e}); pip install 'sparse-transformer[audio]'"
        ) from None
    return soundfile, resample_poly


def _audio_mulaw(path: Path, rate: int) -> np.ndarray:
    """Decode, mix to mono, resample to ``rate`` and mu-law encode one track -> uint8 [samples]."""
    sf, resample_poly = _audio_modules()

    try:
        x, sr = sf.read(path, dtype="float64", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise UserError(
            f"data: cannot decode audio file {path} ({_reason(e)}); pass wav/flac/ogg files or remove this one"
        ) from None
    x = x.mean(axis=1)
    if sr != rate:
        g = gcd(sr, rate)
        x = resample_poly(x, rate // g, sr // g)  # polyphase filter: exact rational rate, e.g. 44.1k * 40/147
    return mulaw_encode(x)  # clips to [-1, 1] first


def _prepare_audio(src: Path, w: _SplitWriter, rate: int, progress: bool, **_) -> dict:
    if rate <= 0:
        raise UserError(f"data: the audio sample rate must be positive, got {rate}; pass e.g. --rate 12000")
    _audio_modules()  # before anything is read or written
    plan, files, rule = _audio_plan(src)
    split_of = {p: s for s in SPLITS for p in plan[s]} if plan else {}
    for path in tqdm(files, desc="audio", disable=None if progress else True, leave=False):
        w.write(split_of.get(path, "train"), _audio_mulaw(path, rate))
    if plan is None:
        _split_90_5_5(w)
    source = f"audio from {src}: {rule}; mono, {rate} Hz, 8-bit mu-law (mu = 255), one byte per sample"
    return {"modality": "audio", "record_len": None, "shape": None, "sample_rate": rate, "source": source}


# -------------------------------------------------------------------------------------------- driver


def _download(url: str, out: Path, progress: bool) -> Path:
    """Fetch ``url`` into ``out`` (kept for later runs); a partial download never gets the final name."""
    dest = out / url.rsplit("/", 1)[1]
    if dest.is_file():
        return dest
    tmp = temporary_name(dest)  # not atomic_output: an error here is the download's and says so
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with _bar(progress, total=total, unit="B", desc=dest.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise UserError(
            f"data: could not download {url} (offline? {_reason(e)}); download it elsewhere and pass --src PATH"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


_PREPARERS = {
    "enwik8": partial(_prepare_text, "enwik8"),
    "text": partial(_prepare_text, "text"),
    "cifar10": _prepare_cifar10,
    "imagenet64": _prepare_imagenet64,
    "mnist": partial(_prepare_mnist, "mnist"),
    "fashion-mnist": partial(_prepare_mnist, "fashion-mnist"),
    "audio": _prepare_audio,
}


def prepare(kind: str, src: str | Path | None, out: str | Path, *, rate: int = 12000, progress: bool = True) -> dict:
    """Convert raw data of one kind into ``out/{train,val,test}.bin`` + ``out/meta.json``.

    Args:
        kind: one of :data:`KINDS`.
        src: the raw data (file or folder, see ``EXPECTS``); None downloads enwik8 / CIFAR-10 into ``out``.
        out: output folder (created if needed).
        rate: audio sample rate in Hz after resampling.
        progress: show tqdm progress bars (only on a terminal).
    Returns:
        the meta dict written to meta.json: kind, modality ("text" | "image" | "audio"), record_len
        (bytes per image, else None), shape ([H, W, C] for images, else None), sample_rate (audio, else
        None), splits ({"train": n_bytes, "val": ..., "test": ...}), source (where the bytes came from
        and the split rule), format_version.
    """
    if kind not in KINDS:
        raise UserError(f"data: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data: cannot create output folder {out} ({_reason(e)}); pass a writable --out") from None
    if src is None:
        if kind not in DOWNLOADS:
            raise UserError(f"data: {kind} cannot be downloaded automatically; pass --src with {EXPECTS[kind]}")
        src = _download(DOWNLOADS[kind], out, progress)
    src = Path(src)
    if not src.exists():
        raise UserError(f"data: {src} does not exist; pass --src with {EXPECTS[kind]}")
    if not (src.is_file() or src.is_dir()):  # a FIFO would wait for a writer forever, a device never ends
        raise UserError(
            f"data: {src} is neither a file nor a folder (a FIFO, socket or device); pass --src with {EXPECTS[kind]}"
        )
    written = [out / f"{s}.bin" for s in SPLITS] + [out / "meta.json"]
    if src.is_file() and any(p.exists() and p.samefile(src) for p in written):
        raise UserError(f"data: --src {src} is a file that prepare writes in --out {out}; prepare into another folder")
    with _SplitWriter(out) as w:
        info = _PREPARERS[kind](src=src, w=w, rate=rate, progress=progress)
        sizes = w.sizes()
        for split, n in sizes.items():
            if n == 0:
                raise UserError(f"data: {src} is too small: its {split} split came out empty ({sizes}); pass more data")
        meta = {"kind": kind, **info, "splits": sizes, "format_version": FORMAT_VERSION}
        meta = {k: meta[k] for k in META_KEYS}
        w.commit(meta)
    return meta
