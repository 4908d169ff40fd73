"""The result table of a paper protocol: our per-seed values beside the published ones, compared through deltas."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from featkd.stats import Summary


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
    baselines = {c.group: Summary.of(c.values).mean for c in cells if c.method == baseline and c.values}
    published_baselines = {c.group: c.published for c in cells if c.method == baseline}
    header = (f"| pair | method | ours: {metric} mean ± std ({ours_dataset}) | ours: median | seeds "
              f"| ours: Δ vs {baseline} | paper: {metric} ({published_dataset}) | paper: Δ vs {baseline} |")
    lines = [header, "|" + "---|" * 8]
    for c in cells:
        if c.values:
            s = Summary.of(c.values)
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
