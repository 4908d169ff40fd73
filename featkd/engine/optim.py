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

    * ``multistep``: ``gamma ** (number of milestones <= epoch)``: milestone m decays the rate after
      m epochs. The AT/NST papers' 60/120/160 read that way give stages of 60/60/40/40 epochs; the
      official AT code decays at the start of 1-indexed epochs 60/120/160, i.e. milestones
      [59, 119, 159] (:func:`decay_milestones`);
    * ``cosine``: half a cosine from 1 to ``min_factor`` over ``epochs``;
    * ``constant``: 1.

    An optional linear warm-up ramps the factor over the first ``warmup_epochs``.
    """

    def __init__(self, name: str, epochs: int, milestones=(), gamma: float = 0.1,
                 warmup_epochs: int = 0, min_factor: float = 0.0):
        if name not in ("multistep", "cosine", "constant"):
            raise ValueError(f"unknown schedule {name!r}; choose one of 'multistep', 'cosine', 'constant'")
        if any(later <= earlier for earlier, later in zip(milestones, milestones[1:])):
            raise ValueError(f"schedule milestones must be strictly increasing, got {list(milestones)}")
        if not gamma > 0:  # a negative gamma gives a negative learning rate: training goes uphill
            raise ValueError(f"schedule gamma must be > 0, got {gamma}")
        if not (warmup_epochs >= 0 and 0 <= min_factor <= 1):
            raise ValueError(f"schedule warmup_epochs must be >= 0 and min_factor in [0, 1], got {warmup_epochs} "
                             f"and {min_factor}")
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


def decay_milestones(epochs: int, fractions: Iterable[float]) -> list[int]:
    """:class:`LRFactor` milestones that decay the rate at the start of the 1-indexed epoch
    ``round(f * epochs)`` for each fraction ``f``: the official AT code's convention, in which
    (0.3, 0.6, 0.8) of 200 epochs give [59, 119, 159], stages of 59/60/40/41 epochs.

    For short runs each decay comes at least one epoch after the previous one (the first not before
    the second epoch), and decays that would not happen within ``epochs`` are left out: two decays
    never fall on the same epoch.
    """
    fractions = list(fractions)
    if fractions != sorted(fractions) or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"decay fractions must be increasing and in (0, 1], got {fractions}")
    milestones: list[int] = []
    for f in fractions:
        milestone = max(round(f * epochs) - 1, milestones[-1] + 1 if milestones else 1)
        if milestone >= epochs:
            break
        milestones.append(milestone)
    return milestones


class EpochSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A per-epoch :class:`LRFactor` schedule that can also restart the optimiser at its milestones.

    With ``restart_momentum_at_milestones`` the optimiser's per-parameter state (SGD's momentum
    buffers) is cleared whenever the epoch reaches a milestone, before any step at the decayed rate:
    exactly what building a new optimiser at each decay does, as the official AT code does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: LRFactor,
                 restart_momentum_at_milestones: bool = False):
        if restart_momentum_at_milestones and factor.name != "multistep":
            raise ValueError(f"restart_momentum_at_milestones needs the 'multistep' schedule (its milestones are "
                             f"the restarts), got {factor.name!r}")
        self.restart_momentum_at_milestones = restart_momentum_at_milestones
        super().__init__(optimizer, factor)

    def step(self) -> None:
        super().step()
        if self.restart_momentum_at_milestones and self.last_epoch in self.lr_lambdas[0].milestones:
            self.optimizer.state.clear()


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "multistep",
    epochs: int = 200,
    milestones: Iterable[int] = (60, 120, 160),
    gamma: float = 0.2,
    warmup_epochs: int = 0,
    min_factor: float = 0.0,
    restart_momentum_at_milestones: bool = False,
) -> EpochSchedule:
    """A per-epoch learning-rate schedule (call ``.step()`` once at the end of each epoch); see
    :class:`LRFactor` and, for ``restart_momentum_at_milestones``, :class:`EpochSchedule`."""
    factor = LRFactor(name, epochs, tuple(milestones), gamma, warmup_epochs, min_factor)
    return EpochSchedule(optimizer, factor, restart_momentum_at_milestones)
