"""The config's device and dtype names as torch objects: the one dtype table and the one device resolver.

``train.device`` takes the forms of :data:`~sparse_transformer.config.DEVICE_FORMS` and
``train.dtype`` the names of :data:`~sparse_transformer.config.Dtype`; training, evaluation and
the benchmarks turn them into ``torch.device`` and ``torch.dtype`` here (docs/design.md §5).
"""

from __future__ import annotations

import torch

from .config import DEVICE_FORMS, is_device_name
from .errors import UserError

# one entry per name of config.Precision (tests/test_config.py checks that they agree)
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(name: str, device: torch.device) -> str:
    """The precision ``name`` (``auto`` | ``bf16`` | ``fp16`` | ``fp32``) stands for on ``device``:
    ``auto`` is bf16 on CUDA and fp32 elsewhere (docs/method.md §8 on mixed precision).

    Raises:
        UserError: an unknown name.
    """
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise UserError(f"dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``name`` on ``device`` (see :func:`dtype_name`). Raises UserError."""
    return DTYPES[dtype_name(name, device)]


def resolve_device(
    name: str | torch.device | None, local_rank: int = 0, option: str = "--train.device"
) -> torch.device:
    """The ``torch.device`` of a config device name.

    Args:
        name: ``auto`` (or None): ``cuda:<local_rank>`` when CUDA is available, else ``cpu``;
            ``cpu``; ``cuda`` (= ``cuda:<local_rank>``); ``cuda:N``; or a ``torch.device``.
        local_rank: this process's device index under torchrun.
        option: the option named in the error message (``--train.device``, ``--device``).
    Raises:
        UserError: a name of another form, or CUDA asked for where none is available.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else name
    if not is_device_name(name):
        raise UserError(f"{option} {name!r} is not a device; use one of {', '.join(DEVICE_FORMS)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available; use {option} cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)
