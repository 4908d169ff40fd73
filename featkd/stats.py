"""Seed statistics for method comparisons: summaries over seeds, paired differences with t intervals.

A cell of a result table over seeds is summarised by its mean, sample standard deviation (ddof=1)
and median (:class:`Summary`). Members of a featkd sweep that share a seed share the student's
initial weights and the batches, so two methods are compared *paired by seed*: the per-seed
differences d_k = method_k - baseline_k, their mean, and a Student-t confidence interval
mean(d) ± t_{n-1, 0.975} · sd(d) / sqrt(n). A difference is "beyond noise" when its interval
excludes 0, it rests on at least :data:`MIN_SEEDS` seeds whose differences are not all equal, and — in a
table that compares several methods with one baseline — it survives Holm's correction for the number
of comparisons (:func:`holm`). With fewer seeds, or no spread, the verdict is "too few seeds".

:func:`detectable_effect` is the smallest true difference a design finds with 80% power at that level,
from the measured spread of the paired differences: what a table can and cannot see; :func:`seeds_to_detect`
and :func:`reference_effect_lines` set it against a reference effect (a published gain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
MIN_SEEDS = 3  # two seeds give an interval from one degree of freedom; two equal differences give width 0
POWER = 0.8
MOST_SEEDS = 200  # seeds_to_detect's search stops here: beyond it, no CPU table is planned


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
        """Whether the interval lies on one side of 0 (with at least :data:`MIN_SEEDS` values and a spread)."""
        return self.is_evidence and (self.low > 0 or self.high < 0)

    @property
    def is_evidence(self) -> bool:
        """Enough seeds, not all differences equal: an interval that can say something."""
        return self.n >= MIN_SEEDS and self.half_width > 0

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


def p_value(values: Sequence[float]) -> float:
    """Two-sided one-sample t-test p-value of ``values`` against 0 (the paired t-test of the differences);
    nan without at least two values and a spread."""
    values = np.asarray(list(values), dtype=float)
    if values.size < 2 or values.std(ddof=1) == 0:
        return math.nan
    return float(scipy_stats.ttest_1samp(values, 0.0).pvalue)


def holm(p_values: Sequence[float], level: float = LEVEL) -> list[bool]:
    """Holm's step-down correction: which of the m hypotheses are rejected at family-wise error ``1 - level``.
    The i-th smallest p-value (from 0) must be ≤ α / (m - i), and every smaller one rejected too; nan never is."""
    alpha = 1 - level
    order = sorted(range(len(p_values)), key=lambda i: (math.isnan(p_values[i]), p_values[i]))
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if math.isnan(p_values[i]) or p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def detectable_effect(differences: Sequence[float], level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test over these seeds detects with probability ``power`` at
    two-sided ``level``: (t_{n-1, 1-α/2} + t_{n-1, power}) · sd / √n with the measured sd; nan for n < 2."""
    summary = Summary.of(differences)
    if summary.n < 2:
        return math.nan
    return _detectable_at(summary.std, summary.n, level, power)


def _detectable_at(std: float, n: int, level: float, power: float) -> float:
    """(t_{n-1, 1-α/2} + t_{n-1, power}) · std / √n: the smallest Δ n seeds with paired spread ``std`` detect."""
    t_sum = scipy_stats.t.ppf(0.5 + level / 2, n - 1) + scipy_stats.t.ppf(power, n - 1)
    return float(t_sum * std / math.sqrt(n))


def seeds_to_detect(differences: Sequence[float], effect: float, level: float = LEVEL, power: float = POWER,
                    most: int = MOST_SEEDS) -> int | None:
    """The fewest seeds at which a paired t-test, at the spread measured in ``differences``, finds a true Δ of
    ``effect`` with ``power``: the first n whose :func:`detectable_effect` is at most ``effect``. None when fewer than
    two differences give no spread, or when even ``most`` seeds would not."""
    summary = Summary.of(differences)
    if summary.n < 2:
        return None
    return next((n for n in range(2, most + 1) if _detectable_at(summary.std, n, level, power) <= effect), None)


def reference_effect_lines(accuracies: dict[str, Sequence[float]], reference: Callable[[str], tuple[float, str] | None],
                           baseline: str = "student") -> list[str]:
    """For each method with a reference effect (``reference(name)`` -> ``(points, source)``, e.g. its published gain):
    whether these seeds detect an effect of that size, and if not, about how many would, at the measured spread."""
    base = accuracies[baseline]
    lines = []
    for name, values in accuracies.items():
        effect = reference(name) if name != baseline else None
        if effect is None or len(values) < 2:
            continue
        differences = [v - b for v, b in zip(values, base)]
        points, source = effect
        detectable, n = detectable_effect(differences), len(differences)
        if detectable <= points:
            lines.append(f"- {name}: +{points:.2f} ({source}) is above the {detectable:.2f} these {n} seeds detect.")
            continue
        needed = seeds_to_detect(differences, points)
        more = f"about {needed} seeds would see it" if needed else f"more than {MOST_SEEDS} seeds would be needed"
        lines.append(f"- {name}: +{points:.2f} ({source}) is below the {detectable:.2f} these {n} seeds detect; "
                     f"{more} at this spread.")
    return lines


def verdict(delta: Interval, survives_correction: bool = True) -> str:
    """'beyond noise' / 'inside noise' / 'too few seeds' for a paired difference; ``survives_correction``: whether it
    passes the correction for the table's number of comparisons (:func:`holm`)."""
    if not delta.is_evidence:
        return "too few seeds"
    if delta.excludes_zero and not survives_correction:
        return "inside noise after Holm"
    return "beyond noise" if delta.excludes_zero else "inside noise"


def verdicts(accuracies: dict[str, Sequence[float]], baseline: str = "student") -> dict[str, str]:
    """Each method's :func:`verdict` against ``baseline``, paired by seed, Holm-corrected over the methods."""
    base = accuracies[baseline]
    others = [name for name in accuracies if name != baseline]
    differences = {name: [v - b for v, b in zip(accuracies[name], base)] for name in others}
    survives = holm([p_value(differences[name]) for name in others])
    return {name: verdict(paired_delta(accuracies[name], base), ok) for name, ok in zip(others, survives)}


def comparison_table(accuracies: dict[str, Sequence[float]], seeds: Sequence[int], *, baseline: str = "student",
                     teacher: float | None = None, metric: str = "test accuracy %") -> str:
    """A Markdown table: each method's mean with its 95% interval, its paired Δ vs ``baseline``, the verdict after
    Holm's correction over the table's comparisons, and the smallest Δ the seeds can detect (:func:`detectable_effect`)."""
    base = accuracies[baseline]
    pct = f"{LEVEL:.0%}"
    others = [name for name in accuracies if name != baseline]
    if not others:  # nothing is compared: a Δ, verdict and detectable-Δ column would be all dashes
        return _summary_table(accuracies, seeds, teacher, metric)
    differences = {name: [v - b for v, b in zip(accuracies[name], base)] for name in others}
    words = verdicts(accuracies, baseline)
    lines = [f"| method | {metric}: mean ± {pct} CI | Δ vs {baseline}: paired mean ± {pct} CI | verdict (Holm, "
             f"{len(others)} comparisons) | per seed {list(seeds)} | smallest detectable Δ |",
             "|---|---|---|---|---|---|"]
    for name, values in accuracies.items():
        absolute = t_interval(values).format()
        if name == baseline:
            delta, word, detectable = "—", "—", "—"
        else:
            d = paired_delta(values, base)
            delta, word = d.format(signed=True), words[name]
            detectable = f"{detectable_effect(differences[name]):.2f}" if d.n >= 2 else "—"
        lines.append(f"| {name} | {absolute} | {delta} | {word} | {', '.join(f'{v:.2f}' for v in values)} "
                     f"| {detectable} |")
    if teacher is not None:
        lines.append(f"| teacher | {teacher:.2f} | — | — | — | — |")
    return "\n".join(lines)


def _summary_table(accuracies: dict[str, Sequence[float]], seeds: Sequence[int], teacher: float | None,
                   metric: str) -> str:
    """Each method's mean with its interval and its per-seed values, for a table that compares nothing."""
    lines = [f"| method | {metric}: mean ± {LEVEL:.0%} CI | per seed {list(seeds)} |", "|---|---|---|"]
    lines += [f"| {name} | {t_interval(values).format()} | {', '.join(f'{v:.2f}' for v in values)} |"
              for name, values in accuracies.items()]
    if teacher is not None:
        lines.append(f"| teacher | {teacher:.2f} | — |")
    return "\n".join(lines)


INTERVAL_NOTE = (f"Intervals: {LEVEL:.0%} Student-t over seeds. Δ is paired by seed (the methods of one seed share its "
                 "data and the student's initial weights): mean of the per-seed differences ± t·sd/√n. 'beyond noise': "
                 f"the Δ interval excludes 0, over ≥ {MIN_SEEDS} seeds whose differences are not all equal, and the "
                 "paired t-test survives Holm's correction for the table's number of comparisons at 5% family-wise. "
                 f"'smallest detectable Δ': the true Δ these seeds find with {POWER:.0%} power at 5% (two-sided, "
                 "uncorrected), from the measured spread of the paired differences; a smaller effect can hide "
                 "inside the noise.")
