"""Seed statistics for method comparisons: summaries over seeds, paired differences with t intervals.

A cell of a result table over seeds is summarised by its mean, sample standard deviation (ddof=1)
and median (:class:`Summary`). Members of a featkd sweep that share a seed share the student's
initial weights and the batches, so two methods are compared *paired by seed*: the per-seed
differences d_k = method_k - baseline_k, their mean, and a Student-t confidence interval
mean(d) ± t_{n-1, 0.975} · sd(d) / sqrt(n). A difference is "beyond noise" when its interval
excludes 0. With one seed there is no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """Values over seeds: mean, sample standard deviation (ddof=1; 0 for a single value), median, count."""

    mean: float
    std: float
    median: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        values = np.asarray(list(values), dtype=float)
        if values.size == 0:
            raise ValueError("a summary over seeds needs at least one value")
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        return cls(float(values.mean()), std, float(np.median(values)), int(values.size))


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t interval over n values (``half_width`` is nan for n < 2)."""

    mean: float
    half_width: float
    n: int
    level: float = LEVEL

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 2, signed: bool = False) -> str:
        sign = "+" if signed else ""
        if math.isnan(self.half_width):
            return f"{self.mean:{sign}.{digits}f}"
        return f"{self.mean:{sign}.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``values`` with its Student-t interval."""
    summary = Summary.of(values)
    if summary.n < 2:
        return Interval(summary.mean, math.nan, summary.n, level)
    sem = summary.std / math.sqrt(summary.n)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, summary.n - 1) * sem)
    return Interval(summary.mean, half, summary.n, level)


def paired_delta(values: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of the per-seed differences ``values[k] - baseline[k]`` with its t interval (paired t)."""
    values, baseline = list(values), list(baseline)
    if len(values) != len(baseline):
        raise ValueError(f"paired comparison needs one value per seed on both sides, got {len(values)} "
                         f"and {len(baseline)}")
    return t_interval([v - b for v, b in zip(values, baseline)], level)


def verdict(delta: Interval) -> str:
    """'beyond noise' / 'inside noise' / 'one seed' for a paired difference."""
    if delta.n < 2:
        return "one seed"
    return "beyond noise" if delta.excludes_zero else "inside noise"


def comparison_table(accuracies: dict[str, Sequence[float]], seeds: Sequence[int], *, baseline: str = "student",
                     teacher: float | None = None, metric: str = "test accuracy %") -> str:
    """A Markdown table: each method's mean with its 95% interval, and its paired Δ vs ``baseline``."""
    base = accuracies[baseline]
    pct = f"{LEVEL:.0%}"
    lines = [f"| method | {metric}: mean ± {pct} CI | Δ vs {baseline}: paired mean ± {pct} CI | verdict "
             f"| per seed {list(seeds)} |", "|---|---|---|---|---|"]
    for name, values in accuracies.items():
        absolute = t_interval(values).format()
        if name == baseline:
            delta, word = "—", "—"
        else:
            d = paired_delta(values, base)
            delta, word = d.format(signed=True), verdict(d)
        lines.append(f"| {name} | {absolute} | {delta} | {word} | {', '.join(f'{v:.2f}' for v in values)} |")
    if teacher is not None:
        lines.append(f"| teacher | {teacher:.2f} | — | — | — |")
    return "\n".join(lines)


INTERVAL_NOTE = (f"Intervals: {LEVEL:.0%} Student-t over seeds. Δ is paired by seed (the members of one seed share "
                 "the student's initial weights and batches): mean of the per-seed differences ± t·sd/√n. "
                 "'beyond noise' means the Δ interval excludes 0.")
