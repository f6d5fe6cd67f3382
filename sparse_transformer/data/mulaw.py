"""8-bit mu-law coding of audio (mu = 255), the byte alphabet of the audio models.

The formula is the one in the data README (and ``torchaudio.functional.mu_law_encoding`` with 256
channels), so prepared audio matches the published compression baselines byte for byte:

    f = sign(x) ln(1 + 255 |x|) / ln(256)        x in [-1, 1]
    q = floor((f + 1) / 2 * 255 + 0.5)           q in 0..255, silence -> 128
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

MU = 255


def mulaw_encode(x: np.ndarray) -> np.ndarray:
    """Float samples -> mu-law bytes.

    Args:
        x: float array of any shape, nominally in [-1, 1] (values outside are clipped).
    Returns:
        uint8 array of the same shape.
    """
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    f = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.floor((f + 1) / 2 * MU + 0.5).astype(np.uint8)


def mulaw_decode(q: np.ndarray) -> np.ndarray:
    """Mu-law bytes -> float samples in [-1, 1] (the inverse of :func:`mulaw_encode`).

    Args:
        q: uint8 (or integer 0..255) array of any shape.
    Returns:
        float32 array of the same shape.
    """
    f = np.asarray(q, dtype=np.float64) / MU * 2 - 1
    return (np.sign(f) * np.expm1(np.abs(f) * np.log1p(MU)) / MU).astype(np.float32)


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """Write mu-law bytes as a mono 16-bit PCM WAV file (playable everywhere, unlike 8-bit mu-law WAV).

    Args:
        path: output file.
        samples: uint8 mu-law bytes, shape [n] (any shape is flattened).
        rate: sample rate in Hz (the ``sample_rate`` of the prepared data, e.g. 12000).
    """
    pcm = np.round(mulaw_decode(np.ravel(samples)) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm.tobytes())
