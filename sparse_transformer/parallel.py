"""Parallelism and recomputation applied from outside the model (torchtitan style, docs/design.md §5).

Order: activation checkpointing (``model.checkpoint``: each block recomputed in the backward pass,
paper §5.4), then per-block ``torch.compile`` of the checkpointed forward (``train.compile``, on
CUDA: the checkpoint is part of the compiled region), then data parallelism: DDP (default) or FSDP2
(``fully_shard`` per block, then the root); the order torchtitan applies them in. Under ``torchrun`` each process drives one device;
without it the data parallelism here is a no-op and training runs in one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import Config
from .runtime import DTYPES, resolve_device


@dataclass
class Dist:
    """Where this process sits: ``rank`` of ``world`` processes, driving ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    ``device`` is ``train.device`` (resolved by :func:`~sparse_transformer.runtime.resolve_device`
    with this process's ``LOCAL_RANK``). Raises UserError for a device that is not there.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return Dist(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev)


def shutdown(finished: bool = False) -> None:
    """Leave the process group (no-op without one); with ``finished``, first wait for every rank.

    ``finished`` is for the end of a run that completed on every rank (all ranks call this at the
    same point): the ranks meet at a barrier before the group is destroyed, so that no rank tears
    down while another is still in a collective, and so that gloo's worker threads get the GIL they
    need to release the earlier collectives' tensors (a tensor that has a Python object decrefs it)
    while this process waits, rather than once it exits. ``destroy_process_group`` does not stop
    those threads while anything still references the group (DTensor's sharding caches keep FSDP2's
    device mesh, and with it the group, until the process ends); a thread that gets the GIL only
    once the interpreter is finalizing is ended by CPython with ``pthread_exit`` inside a
    ``noexcept`` C++ destructor, and the process aborts with "terminate called without an active
    exception" (SIGABRT). The barrier waits without holding the GIL and its own work holds no
    Python tensor. It narrows that race and cannot close it (a worker thread that is not scheduled
    during the whole barrier can still release its work late): the command closes it by leaving a
    torchrun worker without finalizing the interpreter (:func:`~sparse_transformer.cli.console`).

    Leave ``finished`` False on an error path: a rank that failed alone would leave the others
    waiting at the barrier. The group is destroyed even if the barrier raises (a rank that died).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if finished:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (always, without a process group): the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing (paper §5.4): each block of ``model.blocks`` keeps only its input in
    the forward pass and recomputes its attention and feed-forward branches in the backward pass.

    The recomputation runs under ``torch.utils.checkpoint`` with ``use_reentrant=False``, which saves
    and restores the RNG state, so the recomputed dropout masks equal the forward ones and the
    gradients equal those without checkpointing. Without autograd (evaluation, sampling) blocks run
    as they are. The block's forward keeps its signature (extra arguments pass through); parameter
    names and the blocks' other methods are unchanged; applying it twice changes nothing. Returns
    ``model``.
    """
    for block in model.blocks:
        if getattr(block.forward, "recomputes", False):
            continue
        forward = block.forward

        def recomputed(*args, forward=forward, **kwargs) -> torch.Tensor:
            if torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        recomputed.recomputes = True
        block.forward = recomputed  # this instance only: nn.Module.__call__ (and compile, FSDP2) call it
    return model


def compile_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` each block's forward on CUDA (inductor fuses its LayerNorms, GeLU, dropout
    and residual adds around the matmuls; the Triton attention stays one opaque custom op); on other
    devices the blocks stay eager (inductor's CPU backend needs a C++ toolchain and minutes per
    model). Called after :func:`checkpoint_blocks`, so the activation checkpoint is inside the
    compiled region: AOTAutograd's partitioner recomputes in the backward pass only what the backward
    reads (not the block's last projection and residual add), fused into the backward's kernels. With
    the checkpoint around the compiled forward instead, the recomputation re-ran the whole compiled
    forward. H200, one step of the enwik8 preset (30 layers, d 512, n 12,288, batch 8, bf16): 348 ->
    323 ms with the fixed pattern, 606 -> 579 ms dense; at n 65,536 (strided, batch 1): 196 -> 170 ms
    and 1,516 -> 1,502 ms (docs/benchmarks.md). A block's forward must not break the graph (tests
    check the attention path). Shapes are static: a new batch or sequence length (evaluation, another
    model in the same process) gets its own graph instead of a dynamic-shape recompilation, which
    failed inside inductor on CUDA for the checkpointed block (H200, torch 2.11: the second case of
    ``bench train``). Returns ``model``; blocks already compiled are left alone (and
    :func:`checkpoint_blocks` leaves a compiled checkpointed forward alone); parameter names do not
    change."""
    if torch.device(device).type != "cuda":
        return model
    for block in model.blocks:
        forward = block.forward
        if getattr(forward, "compiled_block", False):
            continue
        compiled = torch.compile(forward, dynamic=False)
        compiled.compiled_block = True
        compiled.recomputes = getattr(forward, "recomputes", False)
        block.forward = compiled  # this instance only, as checkpoint_blocks
    return model


def parallelize(model: nn.Module, cfg: Config, d: Dist) -> nn.Module:
    """Apply activation checkpointing (``model.checkpoint``), compile the blocks with their
    checkpoints (``train.compile``) and wrap for data parallelism (``train.parallel``) when
    ``d.world > 1``.

    Returns the module to train: ``model`` itself (single process, or FSDP2, which shards in place)
    or a DDP wrapper around it. Parameter names of ``model`` are unchanged either way.
    """
    t = cfg.train
    if cfg.model.checkpoint:
        checkpoint_blocks(model)
    if t.compile:
        compile_blocks(model, d.device)
    if d.world == 1:
        return model
    if t.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        param_dtype = DTYPES[t.dtype] if t.dtype in ("bf16", "fp16") else None  # fp32 / auto: fp32 weights
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and plain models are returned as they are)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (its parameters are shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (``enabled=False``)."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity without a process group); float64 throughout."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(values: torch.Tensor) -> list[float]:
    """The largest value over all ranks of each entry of ``values`` (a 1-D float tensor on this process's
    device), read to the host: one all-reduce and one host synchronization (none of the former without a
    process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
