"""The config's device and dtype names as torch objects: the one dtype table and the one device resolver.

``train.device`` takes the forms of :data:`~sparse_transformer.config.DEVICE_FORMS` and
``train.dtype`` the names of :data:`~sparse_transformer.config.Dtype`; training, evaluation and
the benchmarks turn them into ``torch.device`` and ``torch.dtype`` here (docs/design.md §5).
"""

from __future__ import annotations

import os

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
        count = torch.cuda.device_count()
        if int(name.partition(":")[2]) >= count:
            raise UserError(
                f"device {name!r} requested but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                f"use {option} cuda:0 (or launch fewer processes)"
            )
    return torch.device(name)


def _memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: a GPU's total memory, or this machine's RAM (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return None


def check_model(model_cfg, device: torch.device, fix: str = "use --model.backend auto", shards: int = 1) -> None:
    """Refuse, before any work starts, a model that cannot train on ``device``: a ``model.backend``
    that cannot run its pattern there (``triton`` or ``flex`` off CUDA, ``sdpa`` with a sparse
    pattern; ``fix`` says what to do), or one whose weights, gradients and Adam moments (16 bytes
    per parameter, split over ``shards`` processes under FSDP) alone exceed the device's memory.

    Raises:
        UserError: naming the problem and the fix.
    """
    from .attention import backend_problem
    from .flops import matmul_params
    from .model import model_pattern

    problem = backend_problem(model_cfg.backend, model_pattern(model_cfg), device)
    if problem is not None:
        raise UserError(f"config: model.{problem}; {fix}")
    params = matmul_params(model_cfg) + (model_cfg.vocab_size + model_cfg.n_ctx) * model_cfg.d_model
    memory = _memory_bytes(device)
    need = 16 * params / shards
    if memory is not None and need > memory:
        raise UserError(
            f"config: the model has about {params:,} parameters, whose weights, gradients and optimizer state "
            f"({need / 2**30:,.0f} GiB per process) exceed the {memory / 2**30:,.0f} GiB of {device}; use a smaller "
            "--model.n_layer or --model.d_model"
        )


def fall_back_backend(model: torch.nn.Module, model_cfg, device: torch.device) -> str | None:
    """For evaluation and sampling (the same numbers from any backend): when the run's ``model.backend``
    cannot run on ``device`` (a run trained with ``triton`` on a GPU, scored on a CPU), switch the
    model's attention to ``auto``. Returns a note saying so, or None when nothing changed."""
    from .attention import backend_problem
    from .model import model_pattern

    problem = backend_problem(model_cfg.backend, model_pattern(model_cfg), device)
    if problem is None:
        return None
    for module in model.modules():
        if hasattr(module, "backend") and hasattr(module, "pattern"):
            module.backend = "auto"
    model_cfg.backend = "auto"
    return f"note: the run's model.{problem}; using backend auto instead"
