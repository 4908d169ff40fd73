"""Optimisers and per-epoch learning-rate schedules (the AT/NST papers' CIFAR setting by default)."""

from __future__ import annotations

import bisect
import math
from typing import Iterable

import torch


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW; the defaults are the AT/NST papers' CIFAR setting."""
    params = list(params)
    if not params:
        raise ValueError("build_optimizer got no parameters to optimise")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of 'sgd', 'adam', 'adamw'")


class LRFactor:
    """The learning-rate multiplier as a pure function of the (0-based) epoch index.

    * ``multistep``: ``gamma ** (number of milestones <= epoch)`` — e.g. the AT/NST
      schedule: lr 0.1, milestones [60, 120, 160], gamma 0.2, 200 epochs;
    * ``cosine``: half a cosine from 1 to ``min_factor`` over ``epochs``;
    * ``constant``: 1.

    An optional linear warm-up ramps the factor over the first ``warmup_epochs``.
    """

    def __init__(self, name: str, epochs: int, milestones=(), gamma: float = 0.1,
                 warmup_epochs: int = 0, min_factor: float = 0.0):
        if name not in ("multistep", "cosine", "constant"):
            raise ValueError(f"unknown schedule {name!r}; choose one of 'multistep', 'cosine', 'constant'")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"schedule milestones must be increasing, got {list(milestones)}")
        self.name, self.epochs, self.milestones, self.gamma = name, epochs, list(milestones), gamma
        self.warmup_epochs, self.min_factor = warmup_epochs, min_factor

    def __call__(self, epoch: int) -> float:
        if self.name == "multistep":
            factor = self.gamma ** bisect.bisect_right(self.milestones, epoch)
        elif self.name == "cosine":
            progress = min(epoch / max(self.epochs, 1), 1.0)
            factor = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = 1.0
        if epoch < self.warmup_epochs:
            factor *= (epoch + 1) / self.warmup_epochs
        return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "multistep",
    epochs: int = 200,
    milestones: Iterable[int] = (60, 120, 160),
    gamma: float = 0.2,
    warmup_epochs: int = 0,
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch learning-rate schedule (call ``.step()`` once at the end of each epoch); see :class:`LRFactor`."""
    factor = LRFactor(name, epochs, tuple(milestones), gamma, warmup_epochs, min_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
