"""Checkpoints: atomic save, exact resume, safe load (no code execution), safetensors export.

A run directory holds

    config.json          the resolved config (written at the start of training)
    checkpoint-N.pt      the training state after step N: model, optimizer, grad scaler, step,
                         per-rank RNG states and data position (single process and DDP); the newest
                         ``train.keep_checkpoints`` are kept, older ones are removed after a save
    checkpoint.pt        the newest of them under a fixed name (a hard link, or a copy where the
                         file system has none): what eval and sample read
    checkpoint-dcp-N/    FSDP2 runs only: model and optimizer shards (torch.distributed.checkpoint);
                         checkpoint-N.pt then holds everything else and names this folder
    model.safetensors    the exported weights (with config.json: everything sampling needs)

The export (:func:`export`: config.json + model.safetensors) is the one shareable format: ``train``
writes it at the end of a run, ``SparseTransformer.save_pretrained`` and ``sparse-transformer
export`` write it through the same function, and :func:`load_export` reads it for
``SparseTransformer.from_pretrained``, ``eval`` and ``sample`` alike.

Training saves and resumes through :func:`save_training` and :func:`load_training`, which hide the
difference between one process, DDP (full state dicts in checkpoint.pt) and FSDP2 (shards through
torch.distributed.checkpoint); :func:`load_model` reads either kind into one process.

Every file is written under a temporary name in the same folder, fsynced and renamed over the old
one (``os.replace`` is atomic), so a crash during a save leaves the previous checkpoint usable;
weights that are not finite (a diverged run) are never saved (:class:`NotFinite`). Resuming takes
the newest checkpoint that loads, passing over (and naming) any that do not.
Files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts
only, so a tampered checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from . import parallel
from .config import Config, config_from_dict
from .errors import UserError
from .model import SparseTransformer

CHECKPOINT = "checkpoint.pt"
_STEP_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)\.pt")  # checkpoint-N.pt: the state after step N
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def save(run_dir: str | Path, state: dict, name: str = CHECKPOINT) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``run_dir/name`` atomically."""
    return _atomic_write(Path(run_dir) / name, lambda f: torch.save(state, f))


def save_config(run_dir: str | Path, cfg: Config) -> Path:
    """Write the resolved config as ``run_dir/config.json`` atomically."""
    return _atomic_write(Path(run_dir) / CONFIG, lambda f: f.write((cfg.to_json() + "\n").encode()))


def load(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save` without executing code (``weights_only=True``).

    Raises UserError when the file is missing, truncated, corrupt, or holds arbitrary Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: {path} does not exist; train first (sparse-transformer train --run-dir DIR)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UserError(
                f"checkpoint: refused to load {path}: it holds Python objects that could run code, "
                "not only tensors; use a checkpoint written by sparse-transformer"
            ) from None
        raise UserError(
            f"checkpoint: {path} is corrupt ({_first_line(e)}); resume from an intact run or train again"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(
            f"checkpoint: {path} is corrupt or truncated ({_first_line(e)}); resume from an intact run or train again"
        ) from None
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint: {path} does not hold a state dict; use a checkpoint written by sparse-transformer"
        )
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise UserError naming the first difference between ``model``'s parameters and ``state``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    fix = "use the config.json saved with it (drop --model.* overrides when resuming), or start a new --run-dir"
    if shapes:
        k = shapes[0]
        raise UserError(
            f"checkpoint: {source} is from another architecture: {k} has shape {list(state[k].shape)} there "
            f"but {list(own[k].shape)} in this model ({len(shapes)} tensors differ); {fix}"
        )
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unknown tensor {extra[0]}"
        raise UserError(
            f"checkpoint: {source} is from another architecture: it {what} "
            f"({len(missing)} missing, {len(extra)} unexpected); {fix}"
        )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` after :func:`check_compatible` (one-line errors)."""
    check_compatible(model, state, source)
    model.load_state_dict(state)


# --- training state: one interface for one process, DDP and FSDP2 --------------------------------

_WEIGHTS_KEYS = ("model", "optimizer", "sharded")


class NotFinite(UserError):
    """:func:`save_training` refused to save: some weight is infinite or NaN (a diverged run)."""


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite, on every rank (FSDP2: each rank checks its
    shards; every rank must call this under a process group, whose ranks then agree)."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    checks = [torch.isfinite(p.detach()).all() for p in params if p.numel()]
    bad = ~torch.stack(checks).all() if checks else torch.tensor(False, device=device)
    return parallel.all_reduce_max(bad.float().reshape(1))[0] == 0


def training_checkpoints(run_dir: str | Path) -> list[Path]:
    """The training states of a run folder, newest first: ``checkpoint-N.pt`` by N, then checkpoint.pt
    (the newest under a fixed name, or the only one of a run saved before checkpoints were numbered)."""
    run_dir = Path(run_dir)
    steps = sorted(
        ((int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pt") if (m := _STEP_CHECKPOINT.fullmatch(p.name))),
        reverse=True,
    )
    found = [p for _, p in steps]
    latest = run_dir / CHECKPOINT
    if latest.is_file() and not any(os.path.samefile(p, latest) for p in found):
        found.append(latest)
    return found


def save_training(
    run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 1
) -> Path:
    """Save a resumable training state; every rank calls this, rank 0 writes the files.

    Args:
        model: the model as trained: plain (one process, or the model inside DDP) or FSDP2-sharded.
        optimizer: its optimizer.
        state: everything else that decides the run's future (``step``, grad scaler, per-rank RNG
            states, ...), the same on every rank; tensors, numbers, strings, lists and dicts only.
        keep: how many checkpoints to keep (this one and the ``keep - 1`` newest before it).
    The weights and optimizer state go into ``checkpoint-<step>.pt``, or for FSDP2 into
    ``checkpoint-dcp-<step>/`` shards that it then names; once it is written, checkpoint.pt is made
    the same file, and checkpoints (and shard folders) beyond the newest ``keep`` are deleted, as
    are any of a later step than this one (left by a run that was resumed from an earlier one).
    Returns the path of ``checkpoint-<step>.pt``.

    Raises:
        NotFinite: a weight is infinite or NaN; nothing is written (on any rank).
    """
    step = state["step"]
    if not all_finite(model):
        raise NotFinite(f"checkpoint: the weights at step {step} are not finite; not saved")
    state = dict(state)
    if parallel.is_sharded(model):
        state["sharded"] = save_sharded(run_dir, step, model, optimizer)
        parallel.barrier()
    else:
        state["model"], state["optimizer"] = model.state_dict(), optimizer.state_dict()
    path = Path(run_dir) / f"checkpoint-{step}.pt"
    if parallel.is_main():
        save(run_dir, state, path.name)
        _link_latest(path)
        _remove_old(Path(run_dir), step, keep)
    parallel.barrier()
    return path


def _link_latest(path: Path) -> None:
    """Make ``checkpoint.pt`` next to ``path`` the same file as ``path``, atomically (a hard link
    renamed over it; a copy where the file system has no hard links)."""
    latest = path.with_name(CHECKPOINT)
    tmp = path.with_name(f".{CHECKPOINT}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    try:
        os.replace(tmp, latest)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _remove_old(run_dir: Path, step: int, keep: int) -> None:
    """Delete ``checkpoint-N.pt`` files (and FSDP2 shard folders) other than the ``keep`` newest up to
    ``step``; those of a later step than ``step`` belong to an abandoned continuation and go too."""
    numbered = {
        int(m.group(1)): p for p in run_dir.glob("checkpoint-*.pt") if (m := _STEP_CHECKPOINT.fullmatch(p.name))
    }
    kept = sorted((n for n in numbered if n <= step), reverse=True)[:keep]
    for n, p in numbered.items():
        if n not in kept:
            p.unlink(missing_ok=True)
    for folder in run_dir.glob("checkpoint-dcp-*"):
        suffix = folder.name[len("checkpoint-dcp-") :]
        if not (suffix.isdigit() and int(suffix) in kept):
            shutil.rmtree(folder, ignore_errors=True)


def load_training(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the newest state :func:`save_training` wrote into ``model`` and ``optimizer`` (every rank
    calls this) and return the rest of it (``step``, grad scaler, per-rank states, ...).

    Checkpoints that do not load (truncated, corrupt, missing shards) are passed over for the next
    newer one; the returned dict then names them (``passed_over``: one line each). ``path`` is the
    checkpoint loaded.

    Raises:
        UserError: no checkpoint, none that loads (the newest one's error), weights of another
            architecture, or a run saved with FSDP2 resumed without it (or the other way round).
    """
    run_dir = Path(run_dir)
    candidates = training_checkpoints(run_dir) or [run_dir / CHECKPOINT]
    passed_over = []
    for path in candidates:  # the newest whose file (and shard folder) reads; its errors are final
        try:
            state = load(path)
            if "sharded" in state and not (run_dir / str(state["sharded"])).is_dir():
                raise UserError(f"checkpoint: {run_dir / str(state['sharded'])} (named by {path}) is missing")
        except UserError as e:
            passed_over.append(str(e))
            continue
        state = _load_training(run_dir, state, model, optimizer)
        return {**state, "path": str(path), "passed_over": passed_over}
    raise UserError(f"{passed_over[0]} (and no older checkpoint loads)" if len(passed_over) > 1 else passed_over[0])


def _load_training(run_dir: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if "sharded" in state and not parallel.is_sharded(model):
        raise UserError(f"train: {run_dir} was trained with FSDP; resume it under torchrun with --train.parallel fsdp")
    if "sharded" not in state and parallel.is_sharded(model):
        raise UserError(f"train: {run_dir} was not trained with FSDP; resume it with --train.parallel ddp")
    _restore(run_dir, state, model, optimizer)
    return {k: v for k, v in state.items() if k not in _WEIGHTS_KEYS}


def _restore(run_dir: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load the weights (and, given ``optimizer``, its state) of a checkpoint.pt's ``state``."""
    if "sharded" in state:
        load_sharded(run_dir, state["sharded"], model, optimizer)
        return
    if "model" not in state:
        raise UserError(
            f"checkpoint: {run_dir / CHECKPOINT} holds no weights; use a checkpoint written by sparse-transformer train"
        )
    load_weights(model, state["model"], str(run_dir / CHECKPOINT))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])


# --- FSDP2: model and optimizer shards through torch.distributed.checkpoint -------------------------


def save_sharded(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Save FSDP2 model and optimizer shards into ``run_dir/checkpoint-dcp-<step>`` (all ranks call this).

    The folder becomes the checkpoint only when rank 0 then saves checkpoint.pt naming it, so a crash
    while writing shards leaves the previous checkpoint in place. Returns the folder name.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"checkpoint-dcp-{step}"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(run_dir) / name))
    return name


def load_sharded(run_dir: str | Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load shards saved by :func:`save_sharded` into an FSDP2 (or plain) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(run_dir) / name
    if not folder.is_dir():
        raise UserError(f"checkpoint: {folder} is missing; resume from an intact run or train again")
    if optimizer is None:
        state = {"model": model.state_dict()}
        _dcp_load(dcp, state, folder)
        model.load_state_dict(state["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    _dcp_load(dcp, state, folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _dcp_load(dcp, state: dict, folder: Path) -> None:
    try:
        with warnings.catch_warnings():  # loading in one process (eval, sample) is intended; no need to warn
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # noqa: BLE001 - DCP wraps planner errors (missing keys, shape mismatches) in its own types
        raise UserError(
            f"checkpoint: cannot load {folder} into this model ({_first_line(e)}); it is from another "
            "architecture or corrupt: use the config.json saved with it, or start a new --run-dir"
        ) from None


# --- export and loading for evaluation / sampling -------------------------------------------------


def export(model: nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` (fp32 weights; the config also in its metadata) and
    ``out_dir/config.json`` (``cfg``, the whole run config), each atomically: the export that
    :func:`load_export` reads. The writer of ``train``'s export and of ``SparseTransformer.save_pretrained``.

    ``model`` is the plain (unwrapped) model, or an FSDP2 model: then every rank must call this (the
    full weights are gathered) and only rank 0 writes. Returns the weights' path.
    """
    from safetensors.torch import save as safetensors_bytes

    out = Path(out_dir)
    state = full_model_state(model)
    if state is None:  # a non-zero rank of an FSDP2 run
        return out / WEIGHTS
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    payload = safetensors_bytes(tensors, metadata={"format": "pt", "config": cfg.to_json()})
    save_config(out, cfg)
    return _atomic_write(out / WEIGHTS, lambda f: f.write(payload))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict; for FSDP2 gathered to rank 0 (other ranks get None)."""
    if not parallel.is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if parallel.is_main() else None


def read_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in ``run_dir/config.json`` (a run directory or an export).

    Raises UserError when it is missing, not JSON, or not a config (unknown sections or keys, values
    of the wrong type, cross-field rules broken)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(
            f"checkpoint: {path} is missing; pass a run directory written by sparse-transformer train or an export"
        )
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint: {path} is not valid JSON ({e}); restore it from the run or train again") from None
    if not isinstance(table, dict):
        raise UserError(f"checkpoint: {path} holds no config (a JSON object of sections); restore it from the run")
    try:
        return config_from_dict(table)
    except UserError as e:
        raise UserError(f"checkpoint: {path} is not a valid config: {e}") from None


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SparseTransformer, Config]:
    """The model of a run (latest checkpoint, else the export) in eval mode on ``device``, and its config
    (also ``model.config``).

    Raises UserError when the folder has no config.json, no weights, corrupt weights, or weights of
    another architecture than config.json describes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"checkpoint: run directory {run_dir} does not exist; pass --run DIR of a finished or running training"
        )
    if (run_dir / CHECKPOINT).is_file():
        cfg = read_run_config(run_dir)
        model = SparseTransformer(cfg)
        _restore(run_dir, load(run_dir / CHECKPOINT), model, None)
        return model.to(device).eval(), cfg
    if (run_dir / CONFIG).is_file() and not (run_dir / WEIGHTS).is_file():
        raise UserError(
            f"checkpoint: {run_dir} has neither {CHECKPOINT} nor {WEIGHTS}; train it first "
            f"(sparse-transformer train --run-dir {run_dir})"
        )
    return load_export(run_dir, device)


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SparseTransformer, Config]:
    """The model of an export (what :func:`export` writes) in eval mode on ``device``, and its config
    (also ``model.config``): the one reader of exports, under ``SparseTransformer.from_pretrained`` and
    under ``eval`` and ``sample`` of a folder without checkpoint.pt.

    The weights are read with safetensors only, so a tampered file cannot execute code.

    Raises:
        UserError: one line: the folder or either file is missing, config.json is not a valid config,
            model.safetensors is truncated or corrupt, or its tensors are not the ones config.json's
            architecture has.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"checkpoint: {folder} is not a folder; pass an export (config.json + {WEIGHTS}) or a run directory"
        )
    cfg = read_run_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(
            f"checkpoint: {folder} has no {WEIGHTS}; pass an export (config.json + {WEIGHTS}) as written by "
            "save_pretrained, sparse-transformer export or the end of sparse-transformer train"
        )
    model = SparseTransformer(cfg)
    load_weights(model, _read_safetensors(weights), str(weights))
    return model.to(device).eval(), cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint: {path} is corrupt ({_first_line(e)}); export it again or train again") from None
