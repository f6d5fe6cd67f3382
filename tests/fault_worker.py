"""A torchrun worker for tests/test_faults_distributed.py: ``sparse-transformer train`` with faults
injected on one rank (``FAULT_RANK``, default 1), from ``FAULTS``:

* ``nan:K``: the loss of this rank's K-th step is NaN;
* ``sigterm:K``: this rank (alone) receives SIGTERM during its K-th step.

Every rank writes ``weights-rank<R>-step<N>.txt`` (the sum of its weights, exactly) into the run folder
each time it saves a checkpoint, so that a test can check that the ranks agree.
"""

import math
import os
import signal
import sys
from pathlib import Path

import torch

from sparse_transformer import checkpoint
from sparse_transformer import train as train_mod
from sparse_transformer.cli import console

rank = int(os.environ["RANK"])
faults = {k: int(v) for k, v in (f.split(":") for f in os.environ.get("FAULTS", "").split(",") if f)}

if rank == int(os.environ.get("FAULT_RANK", "1")):
    real_cross_entropy, real_sample_batch = train_mod.cross_entropy, train_mod.sample_batch
    losses, batches = [], []

    def cross_entropy(logits, x):
        losses.append(1)
        loss = real_cross_entropy(logits, x)
        return loss * math.nan if len(losses) == faults.get("nan") else loss

    def sample_batch(*args, **kwargs):
        batches.append(1)
        if len(batches) == faults.get("sigterm"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample_batch(*args, **kwargs)

    train_mod.cross_entropy, train_mod.sample_batch = cross_entropy, sample_batch

real_save_training = checkpoint.save_training


def save_training(run_dir, model, optimizer, state, keep=1):
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    total = sum(float(p.detach().double().sum()) for p in local)
    (Path(run_dir) / f"weights-rank{rank}-step{state['step']}.txt").write_text(repr(total))
    return real_save_training(run_dir, model, optimizer, state, keep)


checkpoint.save_training = save_training
torch.set_num_threads(1)
console(sys.argv[1:])  # as the command does: a torchrun worker leaves with os._exit
