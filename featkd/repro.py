"""Paper protocols: AT Table 1, NST kernels, Hinton's omitted class — and their result tables.

Each protocol is a list of student configurations (``Member``s of a :mod:`featkd.sweep`) per
teacher/student pair, run at one of three budgets:

* ``full``  — the papers' schedule (200 epochs, batch 128, SGD 0.1, ×0.2 at 60/120/160); for a GPU;
* ``short`` — the same protocol with fewer epochs (minutes on a GPU);
* ``cpu``   — small enough for a 2-core CPU: a class-balanced subset, a few epochs, 2 seeds,
  the smaller pairs.

The dataset is CIFAR-10 when a path is given, Fashion-MNIST otherwise; every table says which,
and the published (CIFAR-10) column is compared through deltas against the student baseline,
never as absolute numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Summary of one cell over seeds."""

    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for a single seed
    median: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        values = np.asarray(list(values), dtype=float)
        if values.size == 0:
            raise ValueError("Stats.of needs at least one value")
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        return cls(float(values.mean()), std, float(np.median(values)), int(values.size))


# ----------------------------------------------------------------------------- tables


@dataclass
class Cell:
    """One row of a result table: a method on a pair, our per-seed values and the published one."""

    group: str  # e.g. "WRN-16-1 ← WRN-16-2"
    method: str  # e.g. "AT", "KD", "student"
    values: list[float]  # ours, per seed (error % or accuracy %)
    published: float | None = None  # the paper's number (on the paper's dataset), None if not verified


def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def results_table(cells: Sequence[Cell], *, baseline: str = "student", metric: str = "error %",
                  ours_dataset: str, published_dataset: str = "CIFAR-10") -> str:
    """A Markdown table: ours (mean ± std, median, n) and Δ vs the baseline row of the same group,
    beside the published value and its Δ. Deltas, not absolute values, are comparable across datasets.
    """
    baselines = {c.group: Stats.of(c.values).mean for c in cells if c.method == baseline and c.values}
    published_baselines = {c.group: c.published for c in cells if c.method == baseline}
    header = (f"| pair | method | ours: {metric} mean ± std ({ours_dataset}) | ours: median | seeds "
              f"| ours: Δ vs {baseline} | paper: {metric} ({published_dataset}) | paper: Δ vs {baseline} |")
    lines = [header, "|" + "---|" * 8]
    for c in cells:
        if c.values:
            s = Stats.of(c.values)
            ours = f"{s.mean:.2f} ± {s.std:.2f}"
            median, n = f"{s.median:.2f}", str(s.n)
            delta = s.mean - baselines[c.group] if c.group in baselines and c.method != baseline else None
        else:
            ours, median, n, delta = "not run", "—", "0", None
        base_pub = published_baselines.get(c.group)
        pub_delta = (c.published - base_pub
                     if c.published is not None and base_pub is not None and c.method != baseline else None)
        lines.append(f"| {c.group} | {c.method} | {ours} | {median} | {n} | {_fmt(delta, signed=True)} "
                     f"| {_fmt(c.published)} | {_fmt(pub_delta, signed=True)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- omitted class (Hinton et al. 2015)


def shift_logit(logits: torch.Tensor, cls: int, shift: float) -> torch.Tensor:
    """``logits`` with ``shift`` added to column ``cls`` — the effect of raising that class's output bias."""
    shifted = logits.clone()
    shifted[:, cls] += shift
    return shifted


@dataclass(frozen=True)
class BiasChoice:
    shift: float
    heldout_accuracy: float  # % on the held-out split at that shift
    curve: tuple[tuple[float, float], ...] = field(repr=False)  # (shift, held-out accuracy %) for every candidate


def choose_bias_shift(logits: torch.Tensor, labels: torch.Tensor, cls: int,
                      candidates: Sequence[float] | None = None) -> BiasChoice:
    """The bias shift for class ``cls`` that maximises accuracy on held-out ``(logits, labels)``.

    Hinton et al. (2015) raised the omitted class's bias by a constant (3.5 on MNIST) without saying
    how it was picked; here it is the candidate (default 0, 0.25, ..., 10) with the highest accuracy
    on a held-out split that contains every class (ties: the smallest shift). The test set is never used.
    """
    candidates = list(np.arange(0.0, 10.0001, 0.25)) if candidates is None else list(candidates)
    if not candidates:
        raise ValueError("choose_bias_shift needs at least one candidate shift")
    curve = []
    for shift in candidates:
        predicted = shift_logit(logits, cls, float(shift)).argmax(1)
        curve.append((float(shift), 100.0 * (predicted == labels).float().mean().item()))
    best = max(curve, key=lambda point: (point[1], -point[0]))
    return BiasChoice(best[0], best[1], tuple(curve))


def apply_bias_shift(model: torch.nn.Module, cls: int, shift: float) -> torch.nn.Linear:
    """Add ``shift`` to the bias of output ``cls`` of the model's last ``nn.Linear`` (in place); return that layer."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError(f"{type(model).__name__} has no final nn.Linear with a bias to shift")
    head = linears[-1]
    with torch.no_grad():
        head.bias[cls] += shift
    return head


@dataclass(frozen=True)
class ClassErrors:
    total_errors: int
    total: int
    class_errors: int
    class_total: int

    @property
    def class_accuracy(self) -> float:
        return 100.0 * (self.class_total - self.class_errors) / max(self.class_total, 1)


def class_errors(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> ClassErrors:
    """Errors overall and on class ``cls`` (Hinton et al. report both)."""
    wrong = logits.argmax(1) != labels
    in_class = labels == cls
    return ClassErrors(int(wrong.sum()), int(labels.numel()), int((wrong & in_class).sum()), int(in_class.sum()))
