"""Learning-rate schedules and optimizer parameter groups for `enspipe train`.

The learning rate is a pure function of where training is (epoch, batch within it) and of
the configuration, set on the optimizer before every step. Nothing about it is saved in a
checkpoint, so a resumed run sets exactly the rates an uninterrupted one would have, and an
extended run (`--resume` with a larger `--epochs`) is defined by the same function:

  step    lr = base * lr_decay ** (epoch // lr_decay_every): depends on the epoch only, so a
          run extended from N to M epochs trains exactly as a run planned for M epochs from
          the start (same weights, bit for bit, on CPU in fp32).
  cosine  lr = base * (1 + cos(pi * t)) / 2 with t the fraction of the post-warmup epochs
          done (per batch). It depends on the total number of epochs: extending a finished
          run restarts the curve where the longer schedule would be at the resume point (a
          warm restart: the epochs already done followed the shorter curve, down to ~0), so
          the extended run is NOT the run planned for M epochs from the start; its epochs
          after the resume point get the longer schedule's rates exactly.
  warmup  (either schedule) the first `warmup_epochs` ramp linearly from base/steps up to
          base, per batch, multiplying the schedule's rate.

The step schedule multiplies by lr_decay once per boundary in Python floats, the arithmetic
torch's StepLR does, so runs keep the rates the trainer used before schedules were added.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["SCHEDULES", "learning_rate", "param_groups", "set_learning_rate"]

from enspipe.configs.train import SCHEDULES  # noqa: E402 -- the vocabulary is the config's (torch-free)


def learning_rate(base: float, *, schedule: str, epoch: int, batch: int, batches: int, epochs: int,
                  warmup_epochs: int = 0, lr_decay: float = 1.0, lr_decay_every: int = 1) -> float:
    """The rate of the step on batch `batch` (0-based, of `batches`) of epoch `epoch` (0-based)."""
    batches = max(1, batches)
    if schedule == "step":
        lr = base
        for _ in range(epoch // lr_decay_every):
            lr *= lr_decay
    elif schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-9)
        t = min(max((epoch + batch / batches - warmup_epochs) / span, 0.0), 1.0)
        lr = base * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if warmup_epochs and epoch < warmup_epochs:
        lr *= min(1.0, (epoch * batches + batch + 1) / (warmup_epochs * batches))
    return lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> Iterable | list[dict]:
    """The optimizer's parameters: one group without weight decay (as before the option
    existed, so the optimizer state keeps its layout), else timm's split: biases and
    normalisation weights (tensors of one dimension or fewer) are not decayed."""
    if not weight_decay:
        return model.parameters()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
