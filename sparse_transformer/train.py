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

Under ``torchrun`` each rank draws its own batches (seed + rank); only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

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
from .runtime import resolve_dtype

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update, as ``train`` and ``bench train`` run it (paper §5.6, §7; docs/method.md §8, §10).

    ``t.grad_accum`` micro-batches ``x = next_batch()`` (int ``[B, n]`` bytes on the model's
    device): forward under autocast to ``dtype`` (none for fp32), cross-entropy over every byte,
    backward through the grad scaler with the gradient all-reduce only on the last micro-batch;
    then unscale, global-norm clipping at ``t.grad_clip`` (off when 0), the optimizer step at
    learning rate ``lr`` and ``zero_grad``.

    Args:
        model: the module to train: plain, DDP-wrapped or FSDP2-sharded (from :func:`setup_training`).
    Returns:
        ``(loss, grad_norm)``: the step's mean loss in nats per byte and the gradient norm before
        clipping, 0-d tensors left on the device (no host synchronization).
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
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


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


def _resolve_config(cfg: Config | None, run_dir, resume, overrides) -> tuple[Config, Path | None]:
    if resume is None:
        if cfg is None:
            raise UserError("train: no config given; pass a Config (or --config FILE) or --resume DIR")
        return validate(cfg), Path(run_dir) if run_dir is not None else None
    resume = Path(resume)
    if not (resume / checkpoint.CHECKPOINT).is_file():
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
        ``test_bits_per_dim``, ``test_tokens``, ``elapsed_s`` and ``sample`` (text runs, if any).
    """
    cfg, run_dir = _resolve_config(cfg, run_dir, resume, overrides)
    t = cfg.train
    d = parallel.init_distributed(t.device)
    lock = None
    try:
        run_dir = run_dir or _new_run_dir(d)
        lock = hold_run_dir(run_dir, d)
        return _train(cfg, run_dir, resume is not None, d)
    finally:
        if lock is not None:
            lock.release()
        parallel.shutdown()


def _train(cfg: Config, run_dir: Path | None, resuming: bool, d: parallel.Dist) -> dict:
    t, device = cfg.train, d.device
    set_threads(device)
    dtype = resolve_dtype(t.dtype, device)
    run_dir = run_dir or _new_run_dir(d)
    if not resuming and (run_dir / checkpoint.CHECKPOINT).exists():
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
    model = SparseTransformer(cfg.model).to(device)
    torch.manual_seed(t.seed + d.rank)  # then a different dropout stream and batch order per rank
    rng = np.random.default_rng(t.seed + d.rank)
    ddp_model, optimizer, scaler = setup_training(model, cfg, d, dtype)

    step, elapsed0, loss_sum, loss_steps = 0, 0.0, 0.0, 0
    timing = new_timing()
    if resuming:
        state = checkpoint.load_training(run_dir, model, optimizer)
        check_resume_state(state, run_dir / checkpoint.CHECKPOINT)
        step, elapsed0 = state["step"], state["elapsed_s"]
        if step > t.max_steps:
            raise UserError(
                f"train: {run_dir} is at step {step}, past --train.max_steps {t.max_steps}; pass "
                f"--train.max_steps {step} or more to continue it"
            )
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
                f"checkpoint: {run_dir / checkpoint.CHECKPOINT} holds a grad scaler or random state that cannot "
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
        checkpoint.remove_old_sharded(run_dir, state.get("sharded") if resuming else None)  # unfinished saves
        if resuming:
            for warning in runfolder.trim_log(run_dir / METRICS, step):
                say(warning)
            say(f"resumed {run_dir} at step {step} of {t.max_steps}")

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
        mine = {"rng": rng_state(rng, device), "loss_sum": loss_sum.item(), "loss_steps": loss_steps}
        state = {
            "step": step,
            "elapsed_s": elapsed0 + time.perf_counter() - t_start,
            "scaler": scaler.state_dict(),
            "timing": dict(timing),
            "ranks": parallel.all_gather_object(mine),
        }
        checkpoint.save_training(run_dir, model, optimizer, state)

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
    while step < t.max_steps and not (budget_s and timing["train_s"] >= budget_s):
        if budget_s and step >= t.warmup_steps and timing["warmup_end_s"] is None:
            timing["warmup_end_s"] = timing["train_s"]
        time_progress = 0.0
        if budget_s and timing["warmup_end_s"] is not None:
            time_progress = (timing["train_s"] - timing["warmup_end_s"]) / max(1e-9, budget_s - timing["warmup_end_s"])
        lr = lr_at(step, t, time_progress)
        t_step = time.perf_counter()
        step_loss, grad_norm = train_step(ddp_model, optimizer, scaler, next_batch, t, dtype, lr)
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
        loss_sum += step_loss.double()  # stays on the device: no host sync per step
        loss_steps += 1
        bar.update(1)
        done = step == t.max_steps or bool(budget_s and timing["train_s"] >= budget_s)

        if step % t.log_every == 0 or done:
            total, count = parallel.all_reduce_sum([loss_sum.item(), loss_steps], device)
            now = time.perf_counter()
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            rec = {
                "step": step,
                "loss": total / count,
                "bits_per_dim": total / count / math.log(2),
                "lr": lr,
                "grad_norm": norm.item(),
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
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}")
            loss_sum, loss_steps, steps_since_log = torch.zeros((), dtype=torch.float64, device=device), 0, 0
            t_log = time.perf_counter()
        if (t.eval_every > 0 and step % t.eval_every == 0) or done:
            t_eval = time.perf_counter()
            val = evaluate_val()
            timing["eval_s"] += time.perf_counter() - t_eval
            say(f"step {step}: val {unit} {val['val_bits_per_dim']:.4f} (training time {timing['train_s']:.0f} s)")
            t_log = time.perf_counter()
        if (t.checkpoint_every > 0 and step % t.checkpoint_every == 0) or done:
            save_checkpoint()
            t_log = time.perf_counter()
    bar.close()
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
        **times,
    }
    if val is not None:
        summary["val_bits_per_dim"] = val["val_bits_per_dim"]
    if d.main:
        print(
            f"test {unit}: {test_bpd:.3f} ({tokens:,} bytes); time: training {times['train_s']:.1f} s, "
            f"validation {times['eval_s']:.1f} s, compilation {times['compile_s']:.1f} s, test {times['test_s']:.1f} s"
        )
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
