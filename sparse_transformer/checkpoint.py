"""Checkpoints: atomic save, exact resume, safe load (no code execution), safetensors export.

A run directory holds

    config.json          the resolved config (written at the start of training)
    checkpoint.pt        the latest training state: model, optimizer, grad scaler, step, per-rank
                         RNG states and data position (single process and DDP)
    checkpoint-dcp-N/    FSDP2 runs only: model and optimizer shards (torch.distributed.checkpoint);
                         checkpoint.pt then holds everything else and names this folder
    model.safetensors    the exported weights (with config.json: everything sampling needs)

Training saves and resumes through :func:`save_training` and :func:`load_training`, which hide the
difference between one process, DDP (full state dicts in checkpoint.pt) and FSDP2 (shards through
torch.distributed.checkpoint), and load either kind into either: a run saved on any number of
processes, with or without FSDP2, resumes on any other; :func:`load_model` reads either kind into
one process.

Every file is written under a temporary name in the same folder, fsynced and renamed over the old
one (``os.replace`` is atomic), so a crash during a save leaves the previous checkpoint usable.

Run folders are not trusted (one may come from someone else): nothing in one can run code or make
the tool read outside it.

* checkpoint.pt is read with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists
  and dicts only) and its contents are checked (types, keys, shapes) before use.
* config.json, checkpoint.pt, model.safetensors and the shard folder must resolve inside the run
  folder (:func:`~sparse_transformer.runfolder.inside`); checkpoint.pt may only name a shard folder
  ``checkpoint-dcp-<step>`` of its own run folder.
* Shards: torch.distributed.checkpoint's own reader (torch 2.13, as earlier releases) unpickles
  ``.metadata`` without restriction (``FileSystemReader.read_metadata`` calls ``pickle.load``) and
  its default planner loads non-tensor entries with ``torch.load(weights_only=False)``; either runs code from a
  tampered folder. So shards are loaded differently: ``.metadata`` goes through a restricted
  unpickler that resolves only the classes DCP's metadata is made of (its dataclasses,
  ``torch.Size``, dtypes and layouts, paths) and is then checked (every shard file a plain
  ``__R_N.distcp`` name inside the folder, no stream transforms, every tensor we ask for present as
  a tensor of our shape); only tensors are asked for (the optimizer's hyperparameters come from the
  config, not the file) and the planner refuses byte entries outright; the tensors themselves are
  read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import parallel
from .config import Config, config_from_dict
from .errors import UserError
from .model import SparseTransformer
from .runfolder import inside

CHECKPOINT = "checkpoint.pt"
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
    except Exception as e:  # noqa: BLE001 - weights_only runs no code; any failure of a damaged file is "corrupt"
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
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"checkpoint: {source} does not hold a state dict of tensors; use a checkpoint written by sparse-transformer"
        )
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

_WEIGHTS_KEYS = ("model", "optimizer")
SHARDED = re.compile(r"checkpoint-dcp-[0-9]+")  # the names of shard folders save_sharded writes
_SHARD_FILE = re.compile(r"__[0-9]+_[0-9]+\.distcp")  # the shard files torch.distributed.checkpoint writes
_OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's state per parameter


def save_training(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Save a resumable training state; every rank calls this, rank 0 writes checkpoint.pt.

    Args:
        model: the model as trained: plain (one process, or the model inside DDP) or FSDP2-sharded.
        optimizer: its optimizer.
        state: everything else that decides the run's future (``step``, grad scaler, per-rank RNG
            states, ...), the same on every rank; tensors, numbers, strings, lists and dicts only.
    The weights and optimizer state go into checkpoint.pt, or for FSDP2 into
    ``checkpoint-dcp-<step>/`` shards that checkpoint.pt then names (shard folders it does not name
    are deleted once it is written). Returns the path of checkpoint.pt.
    """
    state = dict(state)
    if parallel.is_sharded(model):
        state["sharded"] = save_sharded(run_dir, state["step"], model, optimizer)
        parallel.barrier()
    else:
        state["model"], state["optimizer"] = model.state_dict(), optimizer.state_dict()
    path = Path(run_dir) / CHECKPOINT
    if parallel.is_main():
        save(run_dir, state)
        remove_old_sharded(run_dir, state.get("sharded"))
    parallel.barrier()
    return path


def load_training(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the state :func:`save_training` wrote into ``model`` and ``optimizer`` (every rank calls
    this) and return the rest of it (``step``, grad scaler, per-rank states, ..., and ``sharded``:
    the shard folder it was loaded from, if any).

    Any saved kind loads into any model: full state dicts (one process, DDP) into an FSDP2 model are
    sharded on the way in, and FSDP2 shards into a plain model are gathered (torch.distributed.checkpoint
    reshards), so a run resumes on another number of processes or with the other parallelism. The
    optimizer's state (moments, step counts) comes from the checkpoint and its hyperparameters
    (betas, eps, weight decay) from ``optimizer``, i.e. from the config the run resumes with.

    Raises:
        UserError: no checkpoint.pt, a corrupt or tampered one, one that leads outside ``run_dir``,
            weights or optimizer state of another architecture.
    """
    run_dir = Path(run_dir)
    state = load(inside(run_dir, run_dir / CHECKPOINT))
    _restore(run_dir, state, model, optimizer)
    return {k: v for k, v in state.items() if k not in _WEIGHTS_KEYS}


def _restore(run_dir: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load the weights (and, given ``optimizer``, its state) of a checkpoint.pt's ``state``."""
    source = run_dir / CHECKPOINT
    if "sharded" in state:
        load_sharded(run_dir, state["sharded"], model, optimizer)
        return
    if "model" not in state:
        raise UserError(f"checkpoint: {source} holds no weights; use a checkpoint written by sparse-transformer train")
    weights = state["model"]
    check_compatible(model, weights, str(source))
    optim = None if optimizer is None else _optimizer_state(state.get("optimizer"), optimizer, source)
    if parallel.is_sharded(model):  # full state dicts, sharded on the way in
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, _by_name(optim, model, optimizer), options=options)
        return
    model.load_state_dict(weights)
    if optimizer is not None:
        optimizer.load_state_dict(optim)


def _optimizer_state(saved, optimizer: torch.optim.Optimizer, source: Path) -> dict:
    """``saved`` (an ``optimizer.state_dict()`` from checkpoint.pt), checked against ``optimizer``'s
    parameters, with ``optimizer``'s own hyperparameters: what ``optimizer.load_state_dict`` takes.

    Raises UserError when it is not an optimizer state dict of this model's parameters."""

    def unfit(why: str) -> UserError:
        return UserError(
            f"checkpoint: {source} holds optimizer state that does not fit this model ({why}); use a "
            "checkpoint written by sparse-transformer train with this run's config"
        )

    if not (
        isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)
    ):
        raise unfit("no optimizer state dict")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise unfit(f"{len(saved['param_groups'])} parameter groups, not {len(groups)}")
    by_id, out_groups = {}, []
    for i, (old, new) in enumerate(zip(saved["param_groups"], groups)):
        ids = old.get("params") if isinstance(old, dict) else None
        if not isinstance(ids, list) or len(ids) != len(new["params"]):
            raise unfit(f"group {i} does not list {len(new['params'])} parameters")
        for pid, p in zip(ids, new["params"]):
            if not isinstance(pid, int) or isinstance(pid, bool) or pid in by_id:
                raise unfit(f"group {i} names parameter {pid!r} wrongly or twice")
            by_id[pid] = p
        out_groups.append({**{k: v for k, v in new.items() if k != "params"}, "params": list(ids)})
    for pid, entry in saved["state"].items():
        if pid not in by_id or not isinstance(entry, dict):
            raise unfit(f"state for an unknown parameter {pid!r}")
        shape = tuple(by_id[pid].shape)
        for key, value in entry.items():
            if key not in _OPTIMIZER_KEYS or not isinstance(value, torch.Tensor):
                raise unfit(f"parameter {pid} has an unexpected entry {key!r} of type {type(value).__name__}")
            if (value.numel() != 1) if key == "step" else (tuple(value.shape) != shape):
                raise unfit(f"{key} of parameter {pid} has shape {list(value.shape)}, the parameter {list(shape)}")
    return {"state": saved["state"], "param_groups": out_groups}


def _by_name(optim: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An :func:`_optimizer_state` result keyed by parameter name, as torch.distributed's
    ``set_optimizer_state_dict`` takes it."""
    names = {id(p): n for n, p in model.named_parameters()}
    to_name, groups = {}, []
    for old, new in zip(optim["param_groups"], optimizer.param_groups):
        to_name.update({pid: names[id(p)] for pid, p in zip(old["params"], new["params"])})
        groups.append({**old, "params": [names[id(p)] for p in new["params"]]})
    return {"state": {to_name[pid]: v for pid, v in optim["state"].items()}, "param_groups": groups}


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


def sharded_folder(run_dir: str | Path, name) -> Path:
    """The shard folder ``name`` that a checkpoint.pt of ``run_dir`` names, after checking that it is
    one :func:`save_sharded` writes (``checkpoint-dcp-<step>``, inside ``run_dir``, there).

    Raises:
        UserError: any other name (a path elsewhere, ``..``, an absolute path), a symlink out of the
            folder, or a missing folder.
    """
    run_dir = Path(run_dir)
    if not isinstance(name, str) or not SHARDED.fullmatch(name):
        raise UserError(
            f"checkpoint: refused {run_dir / CHECKPOINT}: it names the shard folder {str(name)[:100]!r}, not one "
            "of its own run folder (checkpoint-dcp-STEP); use a checkpoint written by sparse-transformer train"
        )
    folder = inside(run_dir, run_dir / name)
    if not folder.is_dir():
        raise UserError(f"checkpoint: {folder} is missing; resume from an intact run or train again")
    return folder


def load_sharded(run_dir: str | Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load shards saved by :func:`save_sharded` into an FSDP2 (or plain) model and optimizer.

    Only tensors are read: the weights and the optimizer's per-parameter state; its hyperparameters
    stay ``optimizer``'s. The folder and its ``.metadata`` are checked first (:func:`sharded_folder`,
    :func:`read_sharded_metadata`).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = sharded_folder(run_dir, name)
    metadata = read_sharded_metadata(run_dir, folder)
    if optimizer is None:
        request = {"model": model.state_dict()}
        _dcp_load(request, folder, metadata)
        model.load_state_dict(request["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    request = {"model": model_state, "optimizer": {"state": optim_state["state"]}}
    _dcp_load(request, folder, metadata)
    optim_state["state"] = request["optimizer"]["state"]
    set_state_dict(model, optimizer, model_state_dict=request["model"], optim_state_dict=optim_state)


class _Refused(pickle.UnpicklingError):
    pass


@functools.cache
def _metadata_globals() -> dict[tuple[str, str], object]:
    """What a ``.metadata`` pickle may name: DCP's metadata classes and the torch values inside them."""
    import collections
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {
        ("torch.distributed.checkpoint.metadata", n): getattr(metadata, n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
        if hasattr(metadata, n)
    }
    allowed["torch.distributed.checkpoint.filesystem", "_StorageInfo"] = filesystem._StorageInfo
    allowed["torch", "Size"] = torch.Size
    allowed["torch.serialization", "_get_layout"] = torch.serialization._get_layout  # a name -> torch.strided, ...
    allowed.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.layout))})
    for module in ("pathlib", "pathlib._local"):  # the checkpoint's own path (Python 3.13 moved the classes)
        allowed.update({(module, n): getattr(pathlib, n) for n in ("Path", "PosixPath", "PurePosixPath")})
        allowed.update({(module, n): pathlib.PureWindowsPath for n in ("WindowsPath", "PureWindowsPath")})
    allowed["collections", "OrderedDict"] = collections.OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` and nothing else: any other global (a function to call, a class
    with side effects) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        try:
            return _metadata_globals()[module, name]
        except (KeyError, TypeError):
            raise _Refused(f"{module}.{name}") from None


def read_sharded_metadata(run_dir: str | Path, folder: Path):
    """The ``.metadata`` of shard folder ``folder``, read without running code and checked.

    torch.distributed.checkpoint's reader would ``pickle.load`` it (any code). Here a restricted
    unpickler builds it from DCP's metadata classes only; then every entry must be a tensor or byte
    entry, and every shard file a plain ``__R_N.distcp`` name inside ``run_dir`` with no stream
    transforms.

    Raises:
        UserError: a tampered (other globals) or corrupt ``.metadata``, or shard files outside the folder.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    path = inside(run_dir, folder / ".metadata")
    if not path.is_file():
        raise UserError(f"checkpoint: {path} is missing; resume from an intact run or train again")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise UserError(
            f"checkpoint: refused {path}: it names {e}, which a checkpoint's metadata never holds (it could run "
            "code); use a checkpoint written by sparse-transformer train"
        ) from None
    except Exception as e:  # noqa: BLE001 - nothing can run here; any failure of a damaged file is "corrupt"
        raise UserError(
            f"checkpoint: {path} is corrupt ({_first_line(e)}); resume from an intact run or train again"
        ) from None

    def bad(why: str) -> UserError:
        return UserError(f"checkpoint: {path} is corrupt or tampered ({why}); resume from an intact run or train again")

    if not (
        isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict) and isinstance(md.storage_data, dict)
    ):
        raise bad("not DCP metadata")
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not (
            isinstance(key, str)
            and isinstance(entry, TensorStorageMetadata)
            and isinstance(entry.size, torch.Size)
            and isinstance(entry.properties, TensorProperties)
            and isinstance(entry.properties.dtype, torch.dtype)
            and isinstance(entry.chunks, list)
            and all(
                isinstance(c, ChunkStorageMetadata)
                and isinstance(c.offsets, torch.Size)
                and isinstance(c.sizes, torch.Size)
                for c in entry.chunks
            )
        ):
            raise bad(f"entry {str(key)[:100]!r}")
    files = set()
    for index, info in md.storage_data.items():
        if not (
            isinstance(index, MetadataIndex)
            and isinstance(info, _StorageInfo)
            and isinstance(info.relative_path, str)
            and _SHARD_FILE.fullmatch(info.relative_path)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (info.offset, info.length))
            and not getattr(info, "transform_descriptors", None)
        ):
            raise bad(f"storage entry {str(getattr(info, 'relative_path', info))[:100]!r}")
        files.add(info.relative_path)
    for name in sorted(files):
        if not inside(run_dir, folder / name).is_file():
            raise bad(f"shard file {name} is missing")
    md.planner_data, md.storage_meta = None, StorageMeta()
    return md


def _flat(state: dict, prefix: str = "") -> dict:
    """``{"model": {"w": t}}`` -> ``{"model.w": t}``: the keys torch.distributed.checkpoint stores."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _dcp_load(request: dict, folder: Path, metadata) -> None:
    """Fill the tensors of ``request`` in place from ``folder`` (every rank calls this), after checking
    that each is stored there as a tensor of its shape; ``metadata`` from :func:`read_sharded_metadata`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    fix = "use the config.json saved with it, or start a new --run-dir"
    stored = metadata.state_dict_metadata
    for key, value in _flat(request).items():
        entry = stored.get(key)
        if not isinstance(value, torch.Tensor):
            raise AssertionError(f"{key}: only tensors are loaded from shards")  # our request, not the file
        if entry is None:
            raise UserError(f"checkpoint: {folder} is from another architecture: it lacks {key}; {fix}")
        if not isinstance(entry, TensorStorageMetadata):
            raise UserError(f"checkpoint: refused {folder}: {key} is stored as pickled bytes, not a tensor; {fix}")
        if tuple(entry.size) != tuple(value.shape):
            raise UserError(
                f"checkpoint: {folder} is from another architecture: {key} has shape {list(entry.size)} there "
                f"but {list(value.shape)} in this model; {fix}"
            )

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # the checked metadata, never DCP's pickle.load
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # DCP's: torch.load(weights_only=False)
            raise UserError(f"checkpoint: refused {folder}: {read_item.dest_index.fqn} is pickled bytes")

    try:
        with warnings.catch_warnings():  # loading in one process (eval, sample) is intended; no need to warn
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(request, storage_reader=Reader(str(folder)), planner=Planner())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps errors (a BaseException)
        failures = list(getattr(e, "failures", {}).values())
        if failures:  # {rank: exception or (exception, traceback)}: the first rank's own error
            e = failures[0][0] if isinstance(failures[0], tuple) else failures[0]
        if isinstance(e, UserError):
            raise UserError(str(e)) from None
        raise UserError(
            f"checkpoint: cannot load {folder} into this model ({_first_line(e)}); it is corrupt or from another "
            f"architecture: {fix}"
        ) from None


def remove_old_sharded(run_dir: str | Path, keep: str | None) -> None:
    """Delete ``checkpoint-dcp-*`` folders other than ``keep`` (after checkpoint.pt names ``keep``, or
    no shard folder at all: ``keep=None``)."""
    for folder in Path(run_dir).glob("checkpoint-dcp-*"):
        if folder.name != keep:
            if folder.is_symlink():
                folder.unlink()  # the link only, never what it points to
            else:
                shutil.rmtree(folder, ignore_errors=True)


# --- export and loading for evaluation / sampling -------------------------------------------------


def export(model: nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` (fp32 weights) and ``out_dir/config.json``.

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
    """The resolved config saved in ``run_dir/config.json`` (checked as a config file from the command
    line is: unknown keys, wrong types and values out of range are refused)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"checkpoint: {path} is missing; pass a run directory written by sparse-transformer train")
    inside(run_dir, path)
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"checkpoint: {path} is not valid JSON ({e}); restore it from the run or train again") from None
    if not isinstance(table, dict):
        raise UserError(f"checkpoint: {path} is not a config (a JSON object of sections); restore it or train again")
    return config_from_dict(table)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SparseTransformer, Config]:
    """The model of a run (latest checkpoint, else the export) in eval mode on ``device``, and its config.

    Raises UserError when the folder has no config.json, no weights, corrupt or tampered weights,
    files that lead outside it, or weights of another architecture than config.json describes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"checkpoint: run directory {run_dir} does not exist; pass --run DIR of a finished or running training"
        )
    cfg = read_run_config(run_dir)
    model = SparseTransformer(cfg.model)
    ckpt, weights = run_dir / CHECKPOINT, run_dir / WEIGHTS
    if ckpt.is_file():
        _restore(run_dir, load(inside(run_dir, ckpt)), model, None)
    elif weights.is_file():
        load_weights(model, _read_safetensors(inside(run_dir, weights)), str(weights))
    else:
        raise UserError(
            f"checkpoint: {run_dir} has neither {CHECKPOINT} nor {WEIGHTS}; train it first "
            f"(sparse-transformer train --run-dir {run_dir})"
        )
    return model.to(device).eval(), cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint: {path} is corrupt ({_first_line(e)}); export it again or train again") from None
