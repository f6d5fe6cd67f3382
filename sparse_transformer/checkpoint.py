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
torch.distributed.checkpoint), and load either kind into either: a run saved on any number of
processes, with or without FSDP2, resumes on any other; :func:`load_model` reads either kind into
one process.

Every file is written under a temporary name in the same folder, fsynced and renamed over the old
one (``os.replace`` is atomic), so a crash during a save leaves the previous checkpoint usable;
weights that are not finite (a diverged run) are never saved (:class:`NotFinite`). Resuming takes
the newest checkpoint that loads, passing over (and naming) any that do not.

Run folders are not trusted (one may come from someone else): nothing in one can run code or make
the tool read outside it.

* Checkpoints (``checkpoint-N.pt``, checkpoint.pt) are read with ``torch.load(weights_only=True)``
  (tensors, numbers, strings, lists and dicts only) and their contents are checked (types, keys,
  shapes) before use.
* config.json, every checkpoint file, model.safetensors and the shard folders must resolve inside
  the run folder (:func:`~sparse_transformer.runfolder.inside`); a checkpoint may only name a shard
  folder ``checkpoint-dcp-<step>`` of its own run folder. Removing old checkpoints removes a link,
  never what it points to.
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
from .errors import BAD_JSON, UserError, first_line
from .model import SparseTransformer
from .paths import atomic_output
from .runfolder import inside

CHECKPOINT = "checkpoint.pt"
_STEP_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)\.pt")  # checkpoint-N.pt: the state after step N
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then fsync it and rename it to
    ``path`` (:func:`~sparse_transformer.paths.atomic_output`); the folder is created when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, fsync=True) as tmp, open(tmp, "wb") as f:
        write(f)
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
    if path.is_dir():
        raise UserError(f"checkpoint: {path} is a folder, not a checkpoint file; move it out of the run folder")
    if not path.is_file():
        raise UserError(f"checkpoint: {path} does not exist; train first (sparse-transformer train --run-dir DIR)")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise UserError(
                f"checkpoint: refused to load {path}: it holds Python objects that could run code, "
                "not only tensors; use a checkpoint written by sparse-transformer"
            ) from None
        raise _not_a_checkpoint(path, e) from None
    except Exception as e:  # noqa: BLE001 - weights_only runs no code; any failure of a damaged file is "corrupt"
        raise UserError(
            f"checkpoint: {path} is corrupt or truncated ({first_line(e)}); resume from an intact run or train again"
        ) from None
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint: {path} does not hold a state dict; use a checkpoint written by sparse-transformer"
        )
    return state


def _not_a_checkpoint(path: Path, e: BaseException) -> UserError:
    """The one line for a file that does not unpickle as a checkpoint: torch's reason (its
    "Unsupported ..." part: the first line of its message is about its own default), else the
    error's first line."""
    found = re.search(r"Unsupported [^\n.]*", str(e))
    return UserError(
        f"checkpoint: {path} is corrupt or not a checkpoint ({found[0] if found else first_line(e)}); "
        "resume from an intact run or train again"
    )


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
SHARDED = re.compile(r"checkpoint-dcp-([0-9]+)")  # the names of shard folders save_sharded writes
_SHARD_FILE = re.compile(r"__[0-9]+_[0-9]+\.distcp")  # the shard files torch.distributed.checkpoint writes
_OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's state per parameter


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


def _numbered(run_dir: Path) -> dict[int, Path]:
    """The ``checkpoint-N.pt`` files of ``run_dir`` by N."""
    return {int(m.group(1)): p for p in run_dir.glob("checkpoint-*.pt") if (m := _STEP_CHECKPOINT.fullmatch(p.name))}


def training_checkpoints(run_dir: str | Path) -> list[Path]:
    """The training states of a run folder, newest first: ``checkpoint-N.pt`` by N, then checkpoint.pt
    (the newest under a fixed name, or the only one of a run saved before checkpoints were numbered).

    Only names are listed (and links compared, not followed): whether each may be read is
    :func:`load_training`'s check."""
    run_dir = Path(run_dir)
    found = [p for _, p in sorted(_numbered(run_dir).items(), reverse=True)]
    latest = run_dir / CHECKPOINT
    if latest.is_file() or latest.is_symlink():
        own = os.lstat(latest)
        if not any(os.path.samestat(own, os.lstat(p)) for p in found):
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
    with atomic_output(path.with_name(CHECKPOINT), fsync=True) as tmp:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def _remove_old(run_dir: Path, step: int, keep: int) -> None:
    """Delete ``checkpoint-N.pt`` files (and FSDP2 shard folders) other than the ``keep`` newest up to
    ``step``; those of a later step than ``step`` belong to an abandoned continuation and go too."""
    numbered = _numbered(run_dir)
    kept = sorted((n for n in numbered if n <= step), reverse=True)[:keep]
    for n, p in numbered.items():
        if n not in kept:
            p.unlink(missing_ok=True)  # a link: the link only
    _remove_shard_folders(run_dir, lambda n: n in kept)


def remove_unfinished(run_dir: str | Path, keep: str | None = None) -> None:
    """Delete the shard folders of saves that did not finish (no ``checkpoint-N.pt`` of their step),
    except ``keep`` (the folder the resumed checkpoint named); rank 0 calls this as a run starts."""
    run_dir = Path(run_dir)
    numbered = _numbered(run_dir)
    _remove_shard_folders(run_dir, lambda n: n in numbered, keep)


def _remove_shard_folders(run_dir: Path, kept, keep_name: str | None = None) -> None:
    """Delete the ``checkpoint-dcp-*`` entries of ``run_dir`` whose step ``n`` fails ``kept(n)`` (or
    that are not named ``checkpoint-dcp-<step>`` at all), but not ``keep_name``. A symbolic link is
    removed itself, never what it points to."""
    for folder in run_dir.glob("checkpoint-dcp-*"):
        m = SHARDED.fullmatch(folder.name)
        if folder.name != keep_name and not (m and kept(int(m.group(1)))):
            _delete(folder)


def _delete(path: Path) -> None:
    """Remove a file, a folder with what it holds, or a symbolic link (the link only, never what it
    points to: a run folder from elsewhere may hold one)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def load_training(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the newest state :func:`save_training` wrote into ``model`` and ``optimizer`` (every rank
    calls this) and return the rest of it (``step``, grad scaler, per-rank states, ..., ``sharded``:
    the shard folder it was loaded from, if any).

    Checkpoints that do not load (truncated, corrupt, missing shards, or leading out of ``run_dir``)
    are passed over for the next newer one; the returned dict then names them (``passed_over``: one
    line each). ``path`` is the checkpoint loaded.

    Any saved kind loads into any model: full state dicts (one process, DDP) into an FSDP2 model are
    sharded on the way in, and FSDP2 shards into a plain model are gathered (torch.distributed.checkpoint
    reshards), so a run resumes on another number of processes or with the other parallelism. The
    optimizer's state (moments, step counts) comes from the checkpoint and its hyperparameters
    (betas, eps, weight decay) from ``optimizer``, i.e. from the config the run resumes with.

    Raises:
        UserError: no checkpoint, none that loads (the newest one's error), a tampered one (its
            shards), weights or optimizer state of another architecture.
    """
    run_dir = Path(run_dir)
    candidates = training_checkpoints(run_dir) or [run_dir / CHECKPOINT]
    passed_over = []
    for path in candidates:  # the newest whose file (and shard folder) reads; its errors are final
        if path.is_dir() and not path.is_symlink():  # it would block saving this step again: refuse now
            raise UserError(
                f"checkpoint: {path} is a folder where a checkpoint file belongs; move it out of {run_dir}, "
                "then resume again"
            )
        try:
            state = load(inside(run_dir, path))
            if "sharded" in state:
                sharded_folder(run_dir, state["sharded"], path)
        except UserError as e:
            passed_over.append(str(e))
            continue
        _restore(run_dir, state, model, optimizer, path)
        rest = {k: v for k, v in state.items() if k not in _WEIGHTS_KEYS}
        return {**rest, "path": str(path), "passed_over": passed_over}
    raise UserError(f"{passed_over[0]} (and no older checkpoint loads)" if len(passed_over) > 1 else passed_over[0])


def _restore(
    run_dir: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None, source: Path
) -> None:
    """Load the weights (and, given ``optimizer``, its state) of the ``state`` that checkpoint file
    ``source`` of ``run_dir`` holds."""
    if "sharded" in state:
        load_sharded(run_dir, state["sharded"], model, optimizer, source)
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
    while writing shards leaves the previous checkpoint in place. Whatever is at the folder's name
    already (the shards of an abandoned continuation, or a link, which DCP would write through) is
    removed first. Returns the folder name.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"checkpoint-dcp-{step}"
    folder = Path(run_dir) / name
    if parallel.is_main() and (folder.is_symlink() or folder.exists()):
        _delete(folder)
    parallel.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(run_dir) / name))
    return name


def sharded_folder(run_dir: str | Path, name, source: Path | None = None) -> Path:
    """The shard folder ``name`` that checkpoint file ``source`` (default checkpoint.pt) of ``run_dir``
    names, after checking that it is one :func:`save_sharded` writes (``checkpoint-dcp-<step>``,
    inside ``run_dir``, there).

    Raises:
        UserError: any other name (a path elsewhere, ``..``, an absolute path), a symlink out of the
            folder, or a missing folder.
    """
    run_dir = Path(run_dir)
    if not isinstance(name, str) or not SHARDED.fullmatch(name):
        raise UserError(
            f"checkpoint: refused {source or run_dir / CHECKPOINT}: it names the shard folder {str(name)[:100]!r}, not one "
            "of its own run folder (checkpoint-dcp-STEP); use a checkpoint written by sparse-transformer train"
        )
    folder = inside(run_dir, run_dir / name)
    if not folder.is_dir():
        raise UserError(f"checkpoint: {folder} is missing; resume from an intact run or train again")
    return folder


def load_sharded(
    run_dir: str | Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    source: Path | None = None,
) -> None:
    """Load shards saved by :func:`save_sharded` into an FSDP2 (or plain) model and optimizer.

    Only tensors are read: the weights and the optimizer's per-parameter state; its hyperparameters
    stay ``optimizer``'s. The folder and its ``.metadata`` are checked first (:func:`sharded_folder`,
    :func:`read_sharded_metadata`).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = sharded_folder(run_dir, name, source)
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
        raise _not_a_checkpoint(path, e) from None

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
            f"checkpoint: cannot load {folder} into this model ({first_line(e)}); it is corrupt or from another "
            f"architecture: {fix}"
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


def read_run_config(run_dir: str | Path, root: str | Path | None = None) -> Config:
    """The resolved config saved in ``run_dir/config.json`` (a run directory or an export), which
    must resolve inside ``root`` (default ``run_dir``: a run folder may come from elsewhere).

    Raises UserError when it is missing, leads out of ``root``, is not JSON, or not a config
    (unknown sections or keys, values of the wrong type or out of range, cross-field rules broken)."""
    path = Path(run_dir) / CONFIG
    if path.is_dir():
        raise UserError(f"checkpoint: {path} is a folder, not a file; restore the run's config.json")
    if not path.is_file():
        raise UserError(
            f"checkpoint: {path} is missing; pass a run directory written by sparse-transformer train or an export"
        )
    inside(run_dir if root is None else root, path)
    try:
        table = json.loads(path.read_text())
    except (*BAD_JSON, OSError) as e:
        raise UserError(
            f"checkpoint: {path} is not valid JSON ({first_line(e)}); restore it from the run or train again"
        ) from None
    if not isinstance(table, dict):
        raise UserError(f"checkpoint: {path} holds no config (a JSON object of sections); restore it from the run")
    try:
        return config_from_dict(table)
    except UserError as e:
        raise UserError(f"checkpoint: {path} is not a valid config: {e}") from None


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SparseTransformer, Config]:
    """The model of a run (latest checkpoint, else the export) in eval mode on ``device``, and its config
    (also ``model.config``).

    Raises UserError when the folder has no config.json, no weights, corrupt or tampered weights,
    files that lead outside it, or weights of another architecture than config.json describes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"checkpoint: run directory {run_dir} does not exist; pass --run DIR of a finished or running training"
        )
    ckpt = run_dir / CHECKPOINT
    if ckpt.is_file() or ckpt.is_symlink():
        cfg = read_run_config(run_dir)
        model = SparseTransformer(cfg)
        _restore(run_dir, load(inside(run_dir, ckpt)), model, None, ckpt)
        return model.to(device).eval(), cfg
    if (run_dir / CONFIG).is_file() and not (run_dir / WEIGHTS).is_file():
        raise UserError(
            f"checkpoint: {run_dir} has neither {CHECKPOINT} nor {WEIGHTS}; train it first "
            f"(sparse-transformer train --run-dir {run_dir})"
        )
    return load_export(run_dir, device)


def load_export(
    folder: str | Path, device: str | torch.device = "cpu", root: str | Path | None = None
) -> tuple[SparseTransformer, Config]:
    """The model of an export (what :func:`export` writes) in eval mode on ``device``, and its config
    (also ``model.config``): the one reader of exports, under ``SparseTransformer.from_pretrained`` and
    under ``eval`` and ``sample`` of a folder without checkpoint.pt.

    The weights are read with safetensors only, so a tampered file cannot execute code. Both files
    must resolve inside ``root`` (default ``folder``: an export may come from someone else; a Hub
    download passes its repo's cache folder, whose snapshot links into its own blob store).

    Raises:
        UserError: one line: the folder or either file is missing or leads out of ``root``,
            config.json is not a valid config, model.safetensors is truncated or corrupt, or its
            tensors are not the ones config.json's architecture has.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"checkpoint: {folder} is not a folder; pass an export (config.json + {WEIGHTS}) or a run directory"
        )
    root = folder if root is None else root
    cfg = read_run_config(folder, root)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(
            f"checkpoint: {folder} has no {WEIGHTS}; pass an export (config.json + {WEIGHTS}) as written by "
            "save_pretrained, sparse-transformer export or the end of sparse-transformer train"
        )
    model = SparseTransformer(cfg)
    load_weights(model, _read_safetensors(inside(root, weights)), str(weights))
    return model.to(device).eval(), cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint: {path} is corrupt ({first_line(e)}); export it again or train again") from None
