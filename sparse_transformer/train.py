"""Training loop: data -> model -> loss -> optimizer; logs, evaluation, checkpoints (plain functions).

Recipe (paper §5.6 and §7; docs/method.md §8 and §10 for the readings we chose):

* AdamW (fused on CUDA) with decoupled weight decay ``train.weight_decay`` on matrices only: every
  2-D weight of the blocks and W_out. Token embeddings, position tables, the start embedding,
  LayerNorm gains and all biases are not decayed.
* linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.
* global-norm gradient clipping at ``grad_clip``; ``grad_accum`` micro-batches per step.
* dtypes: bf16 autocast, fp16 autocast with dynamic loss scaling (GradScaler), fp32; ``auto`` = bf16
  on CUDA, fp32 on CPU. Weights stay fp32.

A step is one optimizer update; ``step`` counts completed updates. Everything that decides the
future of a run (weights, optimizer, grad scaler, step, torch/CUDA RNG, the numpy Generator that
draws batches, the partial log interval) is in the checkpoint, so an interrupted run resumed with
``--resume`` reproduces the uninterrupted one bit for bit (same device, same number of processes).

Faults (docs/design.md §5):

* SIGTERM or SIGINT during training ends the run at the next step boundary: every rank learns of
  it in the step's all-reduce, so all stop at the same step; the checkpoint of that step is saved,
  one line says so and how to resume, and :class:`Stopped` carries exit status 128 + the signal's
  number (143 for SIGTERM, 130 for SIGINT): the run did not finish, but can be resumed exactly.
  Later signals are ignored until then (torchrun passes a terminal's Ctrl-C on as SIGINT, then
  SIGTERM); SIGKILL still ends it at once, and the previous checkpoint stays intact.
* A step whose loss or gradient norm is not finite on some rank is skipped on every rank (no
  weight or optimizer state changes; it still uses up its batch and its learning rate) and counted
  in metrics (``skipped_steps``, ``skipped_steps_total``). ``train.max_bad_steps`` skipped steps in
  a row end the run (UserError: exit status 2) naming the step and the last good checkpoint.
* Weights that are not finite are never saved; the newest ``train.keep_checkpoints`` checkpoints
  are kept, and ``--resume`` takes the newest one that loads.

Under ``torchrun`` each rank draws its own batches (seed + rank); only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint, parallel, runfolder
from .config import Config, TrainConfig, apply_overrides, data_meta, validate
from .data.loader import default_data_dir, open_split, read_meta, sample_batch
from .errors import UserError
from .evaluate import bits_per_dim, unit_of
from .flops import peak_tflops, train_flops_per_token
from .model import SparseTransformer, cross_entropy
from .paths import check_output_dir
from .runtime import check_model, resolve_dtype

METRICS = "metrics.jsonl"


def lr_at(step: int, t: TrainConfig, time_progress: float = 0.0) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to ``lr * min_lr_ratio``.

    The cosine runs over what is left of the run after the warmup: by steps up to ``max_steps`` or,
    with a time budget (``max_minutes``), by ``time_progress`` (the fraction of the post-warmup
    training time already spent), whichever is further along, so that a budgeted run ends at the
    bottom of its schedule wherever the budget stops it.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, max(time_progress, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)))
    min_lr = t.lr * t.min_lr_ratio
    return min_lr + 0.5 * (t.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (2-D weights except the embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.startswith(("tok_emb.", "pos_emb."))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=device.type == "cuda")


def setup_training(
    model: nn.Module, cfg: Config, d: parallel.Dist, dtype: torch.dtype
) -> tuple[nn.Module, torch.optim.AdamW, torch.amp.GradScaler]:
    """What ``train`` and ``bench train`` wrap around a model on ``d.device``: the module to train
    (:func:`~sparse_transformer.parallel.parallelize`: activation checkpointing, compile, DDP or
    FSDP2), the optimizer (:func:`make_optimizer`) and the grad scaler (active for fp16 only)."""
    train_model = parallel.parallelize(model, cfg, d)
    optimizer = make_optimizer(model, cfg.train, d.device)
    return train_model, optimizer, torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    next_batch: Callable[[], torch.Tensor],
    t: TrainConfig,
    dtype: torch.dtype,
    lr: float,
    stop: Callable[[], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """One optimizer update, as ``train`` and ``bench train`` run it (paper §5.6, §7; docs/method.md §8, §10).

    ``t.grad_accum`` micro-batches ``x = next_batch()`` (int ``[B, n]`` bytes on the model's
    device): forward under autocast to ``dtype`` (none for fp32), cross-entropy over every byte,
    backward through the grad scaler with the gradient all-reduce only on the last micro-batch;
    then unscale, global-norm clipping at ``t.grad_clip`` (off when 0), the optimizer step at
    learning rate ``lr`` and ``zero_grad``.

    The optimizer step is skipped on every rank when the loss or the gradient norm is not finite on
    any rank: weights and optimizer state stay as they were. Under fp16 the grad scaler still
    lowers its scale for an overflow, as when it skips a step itself (its overflows are a subset of
    these: an infinite gradient makes the norm infinite). One all-reduce of two numbers decides this
    and is the step's one host synchronization.

    Args:
        model: the module to train: plain, DDP-wrapped or FSDP2-sharded (from :func:`setup_training`).
        stop: this process's request to end the run, read just before the all-reduce (the number of
            a signal it received; 0 = none); the same all-reduce carries it, so that every rank
            learns at the same step whether any rank asked to stop.
    Returns:
        ``(loss, grad_norm, skipped, stop)``: the step's mean loss in nats per byte and the
        gradient norm before clipping (0-d tensors on the device; the norm is the full one under
        FSDP2), whether the update was skipped, and the largest ``stop`` of all ranks.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = None
    for micro in range(t.grad_accum):
        x = next_batch()
        with parallel.gradient_sync(model, micro == t.grad_accum - 1):
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(x)
            loss = cross_entropy(logits, x) / t.grad_accum
            scaler.scale(loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    asked = float(stop()) if stop is not None else 0.0
    flags = torch.stack([(~finite).float(), torch.full((), asked, device=finite.device)])
    bad, stop = parallel.all_reduce_max(flags)
    if not bad:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, bool(bad), int(stop)


class Stopped(Exception):
    """``train`` ended early because the process received SIGTERM or SIGINT; during training only
    after saving the checkpoint of the step it stopped at. ``str(e)`` is the line ``train`` printed,
    ``signum`` the signal, ``exit_status`` 128 + ``signum`` (as a shell reports a process that a
    signal ended: the run did not finish, and can be resumed)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class _StopSignals:
    """SIGTERM and SIGINT handlers while ``train`` runs (main thread only; a signal the process
    ignores stays ignored). With ``defer`` set (the training loop) the first signal is recorded in
    ``signum`` for the loop to act on at the next step boundary; otherwise it raises
    :class:`Stopped` at once, with the line ``message(signum)``. Later signals are ignored."""

    def __init__(self, message: Callable[[int], str]):
        self.signum, self.defer, self.message = 0, False, message
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(s) is not signal.SIG_IGN:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            return
        self.signum = signum
        if not self.defer:
            raise Stopped(self.message(signum), signum)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def new_timing() -> dict:
    """Seconds spent per activity (kept in the checkpoint): ``train_s`` optimizer steps, ``eval_s``
    validation, ``compile_s`` the first step's excess over the second (kernel compilation),
    ``warmup_end_s`` the training time at which the warmup ended (None before)."""
    return {"train_s": 0.0, "eval_s": 0.0, "compile_s": 0.0, "first_step_s": None, "warmup_end_s": None}


def set_threads(device: torch.device) -> None:
    """On CPU use this process's share of the cores (torchrun starts several processes per host)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def rng_state(rng: np.random.Generator, device: torch.device) -> dict:
    """This process's random state as tensors, ints and dicts (loadable with weights_only)."""
    state = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, rng: np.random.Generator, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned: the torch (and CUDA) generators and ``rng``."""
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _new_run_folder(run_dir) -> Path | None:
    """``run_dir`` of a new run, checked: a folder that can be written and holds no files of another
    run or program that training would overwrite (config.json, metrics.jsonl). A run that already
    saved a checkpoint is refused later, with the hint to resume it."""
    if run_dir is None:
        return None
    run_dir = check_output_dir(run_dir, "train: --run-dir")
    ours = [name for name in (checkpoint.CONFIG, METRICS) if (run_dir / name).exists()]
    if ours and not (run_dir / checkpoint.CHECKPOINT).exists():
        raise UserError(
            f"train: {run_dir} already holds {' and '.join(ours)} but no checkpoint (a run stopped before its "
            "first checkpoint, or files of something else) that a new run would overwrite; choose a new --run-dir "
            "or remove them"
        )
    return run_dir


def _resolve_config(cfg: Config | None, run_dir, resume, overrides) -> tuple[Config, Path | None]:
    if resume is None:
        if cfg is None:
            raise UserError("train: no config given; pass a Config (or --config FILE) or --resume DIR")
        return validate(cfg), _new_run_folder(run_dir)
    resume = Path(resume)
    if not checkpoint.training_checkpoints(resume):
        raise UserError(
            f"train: {resume} has no {checkpoint.CHECKPOINT} to resume; pass a run directory written by "
            "sparse-transformer train"
        )
    cfg = checkpoint.read_run_config(resume)
    apply_overrides(cfg, list(overrides))
    return validate(cfg), Path(run_dir) if run_dir is not None else resume


def fit_to_data(cfg: Config, meta: dict) -> list[str]:
    """Check ``cfg`` against the prepared data's ``meta`` and fill in what the data decides.

    Records the data's modality, image shape and sample rate in ``cfg.data`` (so that an export
    samples without the data). Image data with the default grid positions and no ``model.image_shape`` gets the image's
    row/column/channel position embeddings (``model.position = "image"``, ``image_shape`` from
    meta.json) when ``data.seq_len`` is one whole image. Changes ``cfg`` in place.

    Returns:
        notes to print (what was filled in, and a warm-up that is not shorter than the run).
    Raises:
        UserError: ``data.seq_len`` does not fit the data (longer than the training split, not a whole
            image or an aligned part of one) or image positions whose shape is not the data's.
    """
    m, seq_len, notes = cfg.model, cfg.data.seq_len, []
    record_len, shape = meta["record_len"] or None, meta.get("shape")
    cfg.data.modality, cfg.data.shape, cfg.data.sample_rate = (
        meta["modality"],
        list(shape or []),
        meta["sample_rate"] or 0,
    )
    if record_len and record_len % seq_len:
        raise UserError(
            f"train: data.seq_len = {seq_len} does not fit this image data ({record_len} bytes per image); "
            f"use --data.seq_len {record_len} (one image) or a divisor of it"
        )
    if seq_len > meta["splits"]["train"]:
        raise UserError(
            f"train: data.seq_len = {seq_len} is longer than the training split "
            f"({meta['splits']['train']:,} bytes); use a smaller --data.seq_len or more data"
        )
    if meta["modality"] == "image" and shape and seq_len == record_len:
        if m.position == "grid" and not m.image_shape:
            m.position, m.image_shape = "image", list(shape)
            notes.append(
                f"note: image data: row, column and channel position embeddings for {'x'.join(map(str, shape))} "
                "images (model.position = image)"
            )
        elif m.position == "image" and list(m.image_shape) != list(shape):
            raise UserError(
                f"train: model.image_shape = {m.image_shape} but the data holds {list(shape)} images; "
                f"use --model.image_shape {','.join(map(str, shape))}"
            )
    validate(cfg)
    t = cfg.train
    if t.warmup_steps >= t.max_steps:
        notes.append(
            f"warning: train.warmup_steps = {t.warmup_steps} is not shorter than train.max_steps = "
            f"{t.max_steps}: the learning rate never reaches its peak or decays; lower --train.warmup_steps"
        )
    return notes


def _new_run_dir(d: parallel.Dist) -> Path:
    stamp = parallel.all_gather_object(time.strftime("%Y%m%d-%H%M%S"))[0]  # one name for all ranks
    return Path("runs") / stamp


def hold_run_dir(run_dir: Path, d: parallel.Dist) -> runfolder.RunLock | None:
    """Rank 0 takes the run folder's lock (:class:`~sparse_transformer.runfolder.RunLock`) for the
    whole run; when it cannot, every rank raises the same UserError (one writer per run folder)."""
    lock, error = None, None
    if d.main:
        try:
            lock = runfolder.RunLock(run_dir).acquire()
        except UserError as e:
            error = str(e)
        except OSError as e:  # e.g. a file system without locks: the other ranks must hear of it too
            error = f"train: cannot lock the run folder {run_dir} ({e}); choose another --run-dir"
    error = parallel.all_gather_object(error)[0]
    if error is not None:
        raise UserError(error)
    return lock


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_resume_state(state: dict, path: Path) -> None:
    """Check the training state of a checkpoint (what :func:`~sparse_transformer.checkpoint.load_training`
    returns) before it is used: the fields, their types and ranges.

    Raises:
        UserError: naming the first field that is missing or wrong (a tampered or foreign checkpoint).
    """

    def bad(what: str) -> UserError:
        return UserError(
            f"checkpoint: {path} is malformed ({what}); resume from a checkpoint written by sparse-transformer train"
        )

    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step = {step!r} is not a step count")
    if not _number(state.get("elapsed_s")):
        raise bad("no elapsed_s")
    if not isinstance(state.get("scaler"), dict):
        raise bad("no grad scaler state")
    timing = state.get("timing", {})
    if not isinstance(timing, dict) or not all(
        _number(timing.get(k)) or (k == "warmup_end_s" and timing.get(k) is None)
        for k in ("train_s", "eval_s", "compile_s", "warmup_end_s")
    ):
        raise bad("timing is not a table of seconds")
    skips = state.get("skips", {})  # absent in checkpoints saved before steps could be skipped
    if not isinstance(skips, dict) or not all(
        k in ("total", "in_a_row", "since_log") and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in skips.items()
    ):
        raise bad("skips is not a table of step counts")
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise bad("no per-process states")
    for r, mine in enumerate(ranks):
        rng = mine.get("rng") if isinstance(mine, dict) else None
        if not (
            isinstance(rng, dict)
            and isinstance(rng.get("torch"), torch.Tensor)
            and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("numpy"), dict)
            and _number(mine.get("loss_sum"))
            and isinstance(mine.get("loss_steps"), int)
            and mine["loss_steps"] >= 0
        ):
            raise bad(f"the state of process {r} is incomplete")


def import_wandb():
    """The ``wandb`` module, imported only when a run asks for it (``train.wandb``).

    Raises UserError (one line, with the fix) when it is not installed.
    """
    try:
        import wandb
    except ImportError:
        raise UserError(
            "train: --train.wandb needs the wandb package; pip install wandb "
            "(or pip install 'sparse-transformer[wandb]'), or drop --train.wandb"
        ) from None
    return wandb


class Logger:
    """metrics.jsonl (one JSON object per line), TensorBoard events and, with ``wandb_project``, a
    Weights & Biases run (named after the run folder, with the resolved config); rank 0 only."""

    def __init__(
        self, run_dir: Path, enabled: bool, purge_step: int | None, wandb_project: str = "", config: dict | None = None
    ):
        self.enabled = enabled
        self.file = self.writer = self.wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.file = open(run_dir / METRICS, "a")  # noqa: SIM115 (open for the run, closed in close())
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)
            if wandb_project:
                self.wandb = import_wandb().init(
                    project=wandb_project, name=run_dir.resolve().name, dir=str(run_dir), config=config
                )

    def log(self, record: dict, prefix: str) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {
            f"{prefix}/{key}": value
            for key, value in record.items()
            if key not in ("step", "elapsed_s") and isinstance(value, (int, float))
        }
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()


def train(
    cfg: Config | None, run_dir: str | Path | None, resume: str | Path | None = None, overrides: list[str] = ()
) -> dict:
    """Train (or with ``resume``, continue) a run; returns a summary dict.

    Args:
        cfg: the resolved config; ignored with ``resume`` (the run's config.json is used instead).
        run_dir: where to write; None = ``runs/<timestamp>`` (or the resumed folder).
        resume: a run directory to continue to its configured end; ``overrides``
            (``["--train.max_steps", "2000"]``) apply on top of its saved config, e.g. to extend it.
    Returns:
        dict with ``run_dir``, ``step``, ``params``, ``val_bits_per_dim`` (if evaluated),
        ``test_bits_per_dim``, ``test_tokens``, ``elapsed_s``, ``skipped_steps`` (non-finite steps
        skipped) and ``sample`` (text runs, if any).
    Raises:
        Stopped: SIGTERM or SIGINT ended the run (after saving a checkpoint, when it came during
            training); the line saying so is printed (rank 0) before.
        UserError: bad input, or ``train.max_bad_steps`` non-finite steps in a row, or weights that
            are not finite at a checkpoint (the message names the last good checkpoint).
    """
    cfg, run_dir = _resolve_config(cfg, run_dir, resume, overrides)
    t = cfg.train
    d = parallel.init_distributed(t.device)
    stopper = _StopSignals(
        lambda signum: f"stopped by {_signal_name(signum)} before the first training step; no checkpoint was written"
    )
    lock, finished = None, False
    try:
        run_dir = run_dir or _new_run_dir(d)
        lock = hold_run_dir(run_dir, d)
        summary = _train(cfg, run_dir, resume is not None, d, stopper)
        finished = True  # on every rank: all of them meet at a barrier before leaving the group
        return summary
    except Stopped as e:
        if d.main:
            print(e, file=sys.stderr, flush=True)
        raise
    finally:
        stopper.restore()
        if lock is not None:
            lock.release()
        parallel.shutdown(finished=finished)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _train(cfg: Config, run_dir: Path | None, resuming: bool, d: parallel.Dist, stopper: _StopSignals) -> dict:
    t, device = cfg.train, d.device
    set_threads(device)
    dtype = resolve_dtype(t.dtype, device)
    check_model(cfg.model, device, shards=d.world if t.parallel == "fsdp" else 1)
    run_dir = run_dir or _new_run_dir(d)
    if not resuming and checkpoint.training_checkpoints(run_dir):
        raise UserError(
            f"train: {run_dir} already holds a run; continue it with --resume {run_dir} or choose a new --run-dir"
        )
    say = tqdm.write if d.main else (lambda *_: None)

    # Everything that can refuse the run is checked before anything is written (the run folder and
    # its lock aside, which train() removes again when this refuses).
    data_dir = Path(cfg.data.dir).resolve() if cfg.data.dir else default_data_dir()
    meta = read_meta(data_dir)
    if cfg.data.dir:
        cfg.data.dir = str(data_dir)  # absolute: eval and sample of the run work from any directory
    notes = fit_to_data(cfg, meta)
    if t.wandb and d.main:
        import_wandb()
    for note in notes:
        say(note)
    record_len = meta["record_len"] or None
    train_data, val_data = open_split(data_dir, "train"), open_split(data_dir, "val")
    open_split(data_dir, "test")  # scored at the end: a missing or damaged test split is refused now
    unit = unit_of(meta["modality"])

    torch.manual_seed(t.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
    model = SparseTransformer(cfg).to(device)  # model.config is the run's config (save_pretrained writes it)
    torch.manual_seed(t.seed + d.rank)  # then a different dropout stream and batch order per rank
    rng = np.random.default_rng(t.seed + d.rank)
    ddp_model, optimizer, scaler = setup_training(model, cfg, d, dtype)

    step, elapsed0, loss_sum, loss_steps = 0, 0.0, 0.0, 0
    timing = new_timing()
    # Skipped steps (non-finite loss or gradient norm): in all, in a row, and since the last log record.
    skips = {"total": 0, "in_a_row": 0, "since_log": 0}
    last_saved: tuple[int, Path] | None = None  # (step, path) of the newest checkpoint saved
    if resuming:
        state = checkpoint.load_training(run_dir, model, optimizer)
        check_resume_state(state, Path(state["path"]))
        for line in state["passed_over"]:
            say(f"warning: passed over a checkpoint that does not load: {line}")
        step, elapsed0 = state["step"], state["elapsed_s"]
        if step > t.max_steps:
            raise UserError(
                f"train: {run_dir} is at step {step}, past --train.max_steps {t.max_steps}; pass "
                f"--train.max_steps {step} or more to continue it"
            )
        skips.update(state.get("skips", {}))
        last_saved = (step, Path(state["path"]))
        timing.update(
            {k: state["timing"][k] for k in ("train_s", "eval_s", "compile_s", "warmup_end_s")}
            if "timing" in state
            else {}
        )
        ranks = state["ranks"]
        if len(ranks) != d.world:
            say(
                f"note: resuming {len(ranks)}-process state with {d.world} processes; the batch order will differ "
                "from an uninterrupted run"
            )
        try:
            if state["scaler"]:  # empty: saved without loss scaling (not fp16); a new scale starts then
                scaler.load_state_dict(state["scaler"])
            if d.rank < len(ranks):
                set_rng_state(ranks[d.rank]["rng"], rng, device)
            else:  # a process the run did not have: streams of its own, from the seed, rank and step
                seed = int(np.random.SeedSequence([t.seed, d.rank, step]).generate_state(1)[0])
                torch.manual_seed(seed)
                rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise UserError(
                f"checkpoint: {state['path']} holds a grad scaler or random state that cannot "
                f"be restored ({e}); resume from a checkpoint written by sparse-transformer train"
            ) from None
        # The log interval the checkpoint cut: this process's share of every saved process's losses.
        loss_sum = sum(r["loss_sum"] for r in ranks[d.rank :: d.world])
        loss_steps = sum(r["loss_steps"] for r in ranks[d.rank :: d.world])

    for name in (METRICS, "sample.txt"):  # written in place: a link out of the folder would write elsewhere
        runfolder.inside(run_dir, run_dir / name, "train")

    # Nothing has been written so far: everything that can refuse the run has been checked.
    if d.main:
        checkpoint.save_config(run_dir, cfg)
        for name in runfolder.remove_temporary_files(run_dir):
            say(f"note: removed {run_dir / name}, left by an interrupted write")
        checkpoint.remove_unfinished(run_dir, state.get("sharded") if resuming else None)  # shards of unfinished saves
        if resuming:
            for warning in runfolder.trim_log(run_dir / METRICS, step):
                say(warning)
            say(
                f"resumed {run_dir} at step {step} of {t.max_steps}"
                + (f" from {state['path']}" if state["passed_over"] else "")
            )

    loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)  # this log interval's summed losses
    logger = Logger(
        run_dir, d.main, purge_step=step + 1 if resuming else None, wandb_project=t.wandb, config=cfg.to_dict()
    )
    eval_model = parallel.unwrap(ddp_model)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len * d.world
    flops_per_token = train_flops_per_token(cfg.model)
    peak = peak_tflops(torch.cuda.get_device_name(device), t.peak_tflops) if device.type == "cuda" else None
    val_tokens = t.eval_batches * t.batch_size * cfg.data.seq_len or None
    if d.main:
        say(
            f"run {run_dir}: {model.num_params():,} parameters, {flops_per_token / 1e6:,.2f} MFLOP per token "
            f"(training), {d.world} x {device}, {dtype}, data {data_dir} ({meta['splits']['train']:,} train bytes)"
        )

    def evaluate_val() -> dict:
        nats, tokens = bits_per_dim(
            eval_model, val_data, cfg.data.seq_len, record_len, t.batch_size, device, dtype, val_tokens
        )
        rec = {
            "step": step,
            "val_loss": nats / tokens,
            "val_bits_per_dim": nats / tokens / math.log(2),
            "unit": unit,
            "val_tokens": tokens,
            "elapsed_s": elapsed0 + time.perf_counter() - t_start,
            "train_s": timing["train_s"],
        }
        logger.log(rec, "val")
        return rec

    def save_checkpoint() -> None:
        nonlocal last_saved
        mine = {"rng": rng_state(rng, device), "loss_sum": loss_sum.item(), "loss_steps": loss_steps}
        state = {
            "step": step,
            "elapsed_s": elapsed0 + time.perf_counter() - t_start,
            "scaler": scaler.state_dict(),
            "timing": dict(timing),
            "skips": dict(skips),
            "ranks": parallel.all_gather_object(mine),
        }
        try:
            last_saved = (step, checkpoint.save_training(run_dir, model, optimizer, state, keep=t.keep_checkpoints))
        except checkpoint.NotFinite:
            fail("the weights are not finite, so they were not saved")

    def fail(why: str) -> NoReturn:
        """End a run whose numbers went bad at this step with one line naming the last good checkpoint."""
        bar.close()
        logger.close()
        if last_saved is None:
            where = "no checkpoint was saved before it; train again with a lower --train.lr"
        else:
            where = (
                f"the last good checkpoint is {last_saved[1]} (step {last_saved[0]}); continue from it with a lower "
                f"learning rate: sparse-transformer train --resume {run_dir} --train.lr {t.lr / 10:g}"
            )
        raise UserError(f"train: stopped at step {step}: {why}; {where}") from None

    def next_batch() -> torch.Tensor:
        return sample_batch(train_data, t.batch_size, cfg.data.seq_len, rng, record_len).to(device, non_blocking=True)

    bar = tqdm(
        total=t.max_steps,
        initial=step,
        disable=not (t.progress and d.main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    # Clocks: ``train_s`` counts optimizer steps only (not evaluation, checkpoints or the first
    # step's compilation), which is what a time budget and an equal-wall-clock comparison measure.
    budget_s = t.max_minutes * 60.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_step_s = None
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    val = None
    model.train()
    stopper.defer = True  # from here a signal ends the run at the next step boundary, with a checkpoint
    while step < t.max_steps and not (budget_s and timing["train_s"] >= budget_s):
        if budget_s and step >= t.warmup_steps and timing["warmup_end_s"] is None:
            timing["warmup_end_s"] = timing["train_s"]
        time_progress = 0.0
        if budget_s and timing["warmup_end_s"] is not None:
            time_progress = (timing["train_s"] - timing["warmup_end_s"]) / max(1e-9, budget_s - timing["warmup_end_s"])
        lr = lr_at(step, t, time_progress)
        t_step = time.perf_counter()
        step_loss, grad_norm, skipped, stop = train_step(
            ddp_model, optimizer, scaler, next_batch, t, dtype, lr, stop=lambda: stopper.signum
        )
        if budget_s or timing["first_step_s"] is None:
            sync()  # a budget needs each step's true end; otherwise only the first two are waited for
        step_s = time.perf_counter() - t_step
        if first_step_s is None:
            # The first step of a process compiles kernels (Triton, torch.compile). It is charged
            # the second step's time and the rest is reported as compilation.
            first_step_s = step_s
        else:
            if timing["first_step_s"] is None:
                charge = min(first_step_s, step_s)  # what the first step would have cost once compiled
                timing["first_step_s"] = first_step_s
                timing["compile_s"] += first_step_s - charge
                timing["train_s"] += charge
                say(
                    f"first step {first_step_s:.1f} s (compilation and warm-up {first_step_s - charge:.1f} s, "
                    "not counted as training time)"
                )
            timing["train_s"] += step_s
        step += 1
        steps_since_log += 1
        if skipped:
            skips["total"] += 1
            skips["in_a_row"] += 1
            skips["since_log"] += 1
            if not scaler.is_enabled() or not math.isfinite(step_loss.item()):  # fp16 overflows are routine
                say(f"step {step}: non-finite loss or gradient norm; step skipped ({skips['in_a_row']} in a row)")
        else:
            skips["in_a_row"] = 0
            loss_sum += step_loss.double()  # stays on the device: read at log records
            loss_steps += 1
        bar.update(1)
        done = step == t.max_steps or bool(budget_s and timing["train_s"] >= budget_s)
        halt = skips["in_a_row"] >= t.max_bad_steps

        if step % t.log_every == 0 or done or halt:
            total, count = parallel.all_reduce_sum([loss_sum.item(), loss_steps], device)
            now = time.perf_counter()
            norm = grad_norm.item()
            rec = {
                "step": step,
                "loss": total / count if count else None,  # None: every step since the last record was skipped
                "bits_per_dim": total / count / math.log(2) if count else None,
                "lr": lr,
                "grad_norm": norm if math.isfinite(norm) else None,  # metrics.jsonl stays strict JSON
                "skipped_steps": skips["since_log"],
                "skipped_steps_total": skips["total"],
                "tokens_per_s": tokens_per_step * steps_since_log / (now - t_log),
                "elapsed_s": elapsed0 + now - t_start,
                "train_s": timing["train_s"],
            }
            rec["tflops"] = rec["tokens_per_s"] * flops_per_token / 1e12  # model FLOPs, all processes
            if peak is not None:
                rec["mfu"] = rec["tflops"] / (peak * d.world)
            if device.type == "cuda":
                rec["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(rec, "train")
            bar.set_postfix(loss="-" if rec["loss"] is None else f"{rec['loss']:.3f}", lr=f"{lr:.2e}")
            loss_sum, loss_steps, steps_since_log = torch.zeros((), dtype=torch.float64, device=device), 0, 0
            skips["since_log"] = 0
            t_log = time.perf_counter()
        if halt:
            fail(f"the last {skips['in_a_row']} steps had a non-finite loss or gradient norm (train.max_bad_steps)")
        if stop:  # a signal on some rank: every rank saves this step's checkpoint and ends the run
            save_checkpoint()
            bar.close()
            logger.close()
            raise Stopped(
                f"stopped by {_signal_name(stop)} at step {step}; checkpoint saved to {last_saved[1]}; "
                f"resume with: sparse-transformer train --resume {run_dir}"
                + (" (under torchrun)" if d.world > 1 else ""),
                stop,
            )
        if (t.eval_every > 0 and step % t.eval_every == 0) or done:
            t_eval = time.perf_counter()
            val = evaluate_val()
            timing["eval_s"] += time.perf_counter() - t_eval
            say(f"step {step}: val {unit} {val['val_bits_per_dim']:.4f} (training time {timing['train_s']:.0f} s)")
            t_log = time.perf_counter()
        # Not in the middle of skipped steps: the checkpoints kept are then ones from before the trouble.
        if (t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and not skips["in_a_row"]) or done:
            save_checkpoint()
            t_log = time.perf_counter()
    bar.close()
    stopper.defer = False
    stopper.message = lambda signum: (
        f"stopped by {_signal_name(signum)} after the last step ({step}), whose checkpoint is saved; "
        f"export and score it with: sparse-transformer train --resume {run_dir}"
    )
    if stopper.signum:  # came after the last step's all-reduce
        raise Stopped(stopper.message(stopper.signum), stopper.signum)
    return _finish(
        cfg,
        run_dir,
        model,
        eval_model,
        d,
        dtype,
        record_len,
        unit,
        step,
        val,
        logger,
        elapsed0 + time.perf_counter() - t_start,
        data_dir,
        timing,
        skips["total"],
    )


def _finish(
    cfg: Config,
    run_dir: Path,
    model: nn.Module,
    eval_model: nn.Module,
    d: parallel.Dist,
    dtype: torch.dtype,
    record_len: int | None,
    unit: str,
    step: int,
    val: dict | None,
    logger: Logger,
    elapsed: float,
    data_dir: Path,
    timing: dict,
    skipped_steps: int = 0,
) -> dict:
    """Export the weights, score the test split (its first ``train.test_tokens`` bytes if set), print
    bits per byte and a sample."""
    t, device = cfg.train, d.device
    checkpoint.export(model, cfg, run_dir)
    test_data = open_split(data_dir, "test")
    t_test = time.perf_counter()
    if d.main and t.progress:
        n_test = min(t.test_tokens or len(test_data), len(test_data))
        tqdm.write(f"scoring {n_test:,} bytes of the test split (--train.test_tokens N scores fewer)")
    nats, tokens = bits_per_dim(
        eval_model,
        test_data,
        cfg.data.seq_len,
        record_len,
        t.batch_size,
        device,
        dtype,
        t.test_tokens or None,
        progress=t.progress and d.main,
    )
    test_bpd = nats / tokens / math.log(2)
    times = {k: round(v, 3) for k, v in timing.items() if k in ("train_s", "eval_s", "compile_s")}
    times["test_s"] = round(time.perf_counter() - t_test, 3)
    logger.log({"step": step, "test_bits_per_dim": test_bpd, "unit": unit, "test_tokens": tokens, **times}, "test")
    logger.close()
    summary = {
        "run_dir": str(run_dir),
        "step": step,
        "params": model.num_params(),
        "test_bits_per_dim": test_bpd,
        "unit": unit,
        "test_tokens": tokens,
        "elapsed_s": elapsed,
        "skipped_steps": skipped_steps,
        **times,
    }
    if val is not None:
        summary["val_bits_per_dim"] = val["val_bits_per_dim"]
    if d.main:
        print(
            f"test {unit}: {test_bpd:.3f} ({tokens:,} bytes); time: training {times['train_s']:.1f} s, "
            f"validation {times['eval_s']:.1f} s, compilation {times['compile_s']:.1f} s, test {times['test_s']:.1f} s"
        )
        if skipped_steps:
            print(f"note: {skipped_steps} of {step} steps were skipped (non-finite loss or gradient norm)")
        text = _sample_text(cfg, run_dir, model, device) if not parallel.is_sharded(model) else None
        if text is not None:
            summary["sample"] = text
            print("sample:\n" + text)
    return summary


def _sample_text(cfg: Config, run_dir: Path, model: nn.Module, device: torch.device) -> str | None:
    """A short text sample of a text run (written to run_dir/sample.txt), if sample.py is available."""
    try:
        from .sample import generate
    except ImportError:
        return None
    if cfg.model.position == "image" or data_meta(cfg)["modality"] != "text":
        return None
    s = cfg.sample
    tokens = generate(
        model,
        cfg,
        num=1,
        length=min(s.length or cfg.data.seq_len, cfg.data.seq_len),
        temperature=s.temperature,
        top_k=s.top_k,
        prefix=None,
        device=device,
        seed=s.seed,
    )
    text = bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    (run_dir / "sample.txt").write_text(text)
    return text
