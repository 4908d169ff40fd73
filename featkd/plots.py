"""Figures from run directories: kernel ablations, λ and T sweeps, training curves, attention maps.

Every plotting function takes plain numbers (so it can be tested against its inputs) and
returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as PNG and PDF.
The loaders (:func:`load_run`, :func:`final_metric`, :func:`group_final`) turn the
``metrics.jsonl`` + ``config.yaml`` that the engine writes into those numbers.

Figures are built on :class:`~matplotlib.figure.Figure` directly rather than through pyplot,
so nothing here touches a GUI backend or global figure state (works headless, in threads,
in tests).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from featkd import stats as seed_stats

# Colour-blind-safe (Okabe & Ito) cycle, in the order methods are usually listed.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
REFERENCE_STYLE = {
    "student": {"color": "#555555", "linestyle": "--"},
    "teacher": {"color": "#000000", "linestyle": ":"},
}


# ----------------------------------------------------------------------------- run directories


@dataclass
class Run:
    """One run directory: its config (a plain dict) and its per-epoch metric records."""

    path: Path
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(path: str | Path) -> Run:
    """Read ``config.yaml`` (optional) and ``metrics.jsonl`` (required) from a run directory."""
    path = Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a run directory: it has no metrics.jsonl "
            "(run directories are written by 'featkd train', 'featkd distill' and 'featkd sweep')"
        )
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return Run(path=path, config=config or {}, metrics=records)


def config_value(config: Mapping, dotted: str, default=None):
    """``config_value(cfg, "kd.T")`` -> ``cfg["kd"]["T"]``; list items by index (``terms.0.loss``)."""
    node = config
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, Sequence) and not isinstance(node, str) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


def metric_series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one metric over the records that have it."""
    rows = [r for r in run.metrics if key in r and r[key] is not None]
    if not rows:
        known = sorted({k for r in run.metrics for k in r})
        raise KeyError(f"run {run.path} has no metric {key!r}; it has: {', '.join(known)}")
    epochs = np.array([r.get("epoch", i) for i, r in enumerate(rows)], dtype=float)
    return epochs, np.array([float(r[key]) for r in rows])


def final_metric(run: Run, key: str) -> float:
    """The metric's value at the last epoch (the last epoch, not the best one: no test-set selection)."""
    return float(metric_series(run, key)[1][-1])


def group_final(runs: Sequence[Run], by: str | Callable[[Run], object], key: str) -> dict[object, list[float]]:
    """Final ``key`` of each run, grouped by a dotted config key (or a function of the run), in first-seen order."""
    label_of = by if callable(by) else (lambda run: config_value(run.config, by, run.name))
    groups: dict[object, list[float]] = {}
    for run in runs:
        groups.setdefault(label_of(run), []).append(final_metric(run, key))
    return groups


# ----------------------------------------------------------------------------- figures


def save_figure(fig: Figure, stem: str | Path, *, overwrite: bool = False, dpi: int = 150) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; an existing file is kept unless ``overwrite``. The suffixes are added to
    the whole name (``limited-data-0.01`` stays itself), and a given ``.png`` or ``.pdf`` names the same pair."""
    stem = Path(stem)
    if stem.suffix in (".png", ".pdf"):
        stem = stem.with_suffix("")
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"not overwriting {', '.join(existing)}: choose another --out, or replace them with "
                              "--overwrite (overwrite=True from Python)")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return paths


def _reference_lines(ax, references: Mapping[str, float | Sequence[float] | None], horizontal: bool = True) -> None:
    for label, value in references.items():
        if value is None:
            continue
        mean = seed_stats.Summary.of([value] if np.isscalar(value) else value).mean
        style = REFERENCE_STYLE.get(label, {"color": "#777777", "linestyle": "-."})
        ax.axhline(mean, linewidth=1.2, label=f"{label} ({mean:.2f})", **style)


def kernel_ablation(
    results: Mapping[str, Sequence[float]],
    *,
    student: float | Sequence[float] | None = None,
    teacher: float | Sequence[float] | None = None,
    ylabel: str = "test accuracy (%)",
    title: str | None = None,
) -> Figure:
    """One bar per method/kernel: mean over seeds with ±1 std error bars and each seed as a dot.

    ``results`` maps a label (``"nst-poly"``) to its per-seed values; ``student`` and ``teacher``
    (a value or per-seed values) are drawn as horizontal reference lines.
    """
    if not results:
        raise ValueError("kernel_ablation needs at least one method with values")
    labels = list(results)
    stats = [seed_stats.Summary.of(results[label]) for label in labels]
    fig = Figure(figsize=(max(4.5, 0.9 * len(labels) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(labels))]
    # Points with error bars rather than bars: the y axis does not start at 0, and a truncated bar
    # would exaggerate the differences between methods.
    for i, label in enumerate(labels):
        values = np.asarray(results[label], dtype=float)
        offsets = np.linspace(-0.12, 0.12, values.size) if values.size > 1 else np.zeros(1)
        ax.plot(x[i] + offsets, values, "o", color=colors[i], alpha=0.45, markersize=4, gid=f"seeds:{label}")
    ax.errorbar(x, [s.mean for s in stats], yerr=[s.std for s in stats], fmt="none", ecolor="black",
                        capsize=6, elinewidth=1.2)
    ax.scatter(x, [s.mean for s in stats], s=60, c=colors, edgecolors="black", zorder=3, gid="means")
    _reference_lines(ax, {"student": student, "teacher": teacher})
    all_values = np.concatenate([np.asarray(v, dtype=float) for v in results.values()]
                                + [np.atleast_1d(np.asarray(r, dtype=float)) for r in (student, teacher) if r is not None])
    spread = max(float(all_values.max() - all_values.min()), 0.5)
    ax.set_ylim(all_values.min() - 0.6 * spread, all_values.max() + 0.4 * spread)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("method")
    ax.set_title(title or "Distillation methods (mean ± std over seeds; dots: single seeds)")
    ax.grid(axis="y", alpha=0.3)
    if student is not None or teacher is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="reference")
    return fig


def paired_deltas(accuracies: Mapping[str, Sequence[float]], *, baseline: str = "student",
                  teacher: float | None = None, title: str | None = None) -> Figure:
    """Each method's paired Δ vs ``baseline`` (mean of per-seed differences) with its 95% t interval.

    A difference beyond the noise (:func:`featkd.stats.verdicts`: its interval excludes 0 over enough seeds and it
    survives Holm's correction) is drawn filled, and a method with too few seeds for a verdict says so under
    its name; the per-seed differences are dots. The teacher's gap to the baseline's mean, when given, is a
    dashed line.
    """
    base = accuracies[baseline]
    labels = [name for name in accuracies if name != baseline]
    if not labels:
        raise ValueError("paired_deltas needs at least one method besides the baseline")
    words = seed_stats.verdicts(dict(accuracies), baseline)
    fig = Figure(figsize=(max(4.5, 0.9 * len(labels) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        delta = seed_stats.paired_delta(accuracies[label], base)
        per_seed = np.asarray(accuracies[label], dtype=float) - np.asarray(base, dtype=float)
        color = PALETTE[i % len(PALETTE)]
        offsets = np.linspace(-0.12, 0.12, per_seed.size) if per_seed.size > 1 else np.zeros(1)
        ax.plot(i + offsets, per_seed, "o", color=color, alpha=0.45, markersize=4, gid=f"seeds:{label}")
        half = 0.0 if np.isnan(delta.half_width) else delta.half_width
        ax.errorbar([i], [delta.mean], yerr=[half], fmt="none", ecolor="black", capsize=6, elinewidth=1.2)
        ax.scatter([i], [delta.mean], s=60, c=color if words[label] == "beyond noise" else "white", edgecolors=color,
                   linewidths=2, zorder=3, gid=f"mean:{label}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if teacher is not None:
        gap = teacher - float(np.mean(base))
        low, high = ax.get_ylim()
        # the teacher's gap as a line only where it does not squeeze the deltas flat; its value is always given
        if low - (high - low) <= gap <= high + (high - low):
            ax.axhline(gap, color="gray", linestyle="--", linewidth=1, label=f"teacher − {baseline} mean ({gap:+.2f})")
        else:
            ax.plot([], [], " ", label=f"teacher − {baseline} mean: {gap:+.2f} (off the scale)")
        # below the figure, where the constrained layout makes room under the (rotated) method names
        fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ticks = [label if words[label] != "too few seeds" else f"{label}\n(too few seeds)" for label in labels]
    ax.set_xticks(np.arange(len(labels)), ticks, rotation=30 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel(f"Δ test accuracy vs {baseline} (points)")
    ax.set_title(textwrap.fill(title or f"Paired Δ vs {baseline}: mean ± 95% CI over seeds (filled: beyond noise "
                               "after Holm)", 60), fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    return fig


def data_size_curve(results: Sequence[Mapping], *, title: str | None = None) -> Figure:
    """Test accuracy against the students' share of the training data: per method the mean over seeds
    with its 95% t band (``results``: the ``results.json`` of :mod:`featkd.repro.limited_data` tables)."""
    if not results:
        raise ValueError("data_size_curve needs at least one limited-data result")
    results = sorted(results, key=lambda r: r["fraction"])
    methods = list(dict.fromkeys(m for r in results for m in r["accuracies"]))
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        points = [(r["fraction"] * 100, seed_stats.t_interval(r["accuracies"][method]))
                  for r in results if method in r["accuracies"]]
        x = np.array([p for p, _ in points])
        mean = np.array([iv.mean for _, iv in points])
        half = np.array([0.0 if np.isnan(iv.half_width) else iv.half_width for _, iv in points])
        color = PALETTE[i % len(PALETTE)]
        ax.plot(x, mean, "o-", color=color, label=method, gid=f"curve:{method}")
        ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.15, linewidth=0)
    teachers = [r["teacher_acc"] for r in results if r.get("teacher_acc") is not None]
    if teachers:
        ax.axhline(teachers[0], color="gray", linestyle="--", linewidth=1, label="teacher")
    ax.set_xscale("log")
    # the cells may differ in length: each tick says how many epochs its students trained
    ax.set_xticks([r["fraction"] * 100 for r in results],
                  [f"{r['fraction'] * 100:g}%" + (f"\n{r['setup']['epochs']} ep" if "setup" in r else "")
                   for r in results])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels ("2×10⁰") would sit between the shares
    ax.set_xlabel("students' share of the training split")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy against transfer-set size (mean ± 95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def sweep_plot(
    series: Mapping[str, Mapping[float, Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str = "test accuracy (%)",
    logx: bool = False,
    student: float | Sequence[float] | None = None,
    teacher: float | Sequence[float] | None = None,
    title: str | None = None,
) -> Figure:
    """Metric against a swept hyper-parameter (a loss weight λ, a KD temperature T): one line per series.

    ``series`` maps a label to ``{x value: per-seed values}``; points are means, bars ±1 std.
    """
    if not series:
        raise ValueError("sweep_plot needs at least one series")
    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(series.items()):
        xs = sorted(points)
        stats = [seed_stats.Summary.of(points[x]) for x in xs]
        bars = ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std for s in stats], marker="o", capsize=3,
                           color=PALETTE[i % len(PALETTE)], label=label)
        bars.lines[0].set_gid(f"series:{label}")
    _reference_lines(ax, {"student": student, "teacher": teacher})
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"Sweep over {xlabel} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def training_curves(runs: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                    *, title: str | None = None) -> Figure:
    """One panel per metric (each named loss, accuracy), one line per run, against the epoch.

    ``runs`` maps a run label to ``{metric name: (epochs, values)}``.
    """
    keys = list(dict.fromkeys(k for curves in runs.values() for k in curves))
    if not keys:
        raise ValueError("training_curves needs at least one metric")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for i, (label, curves) in enumerate(runs.items()):
            if key in curves:
                epochs, values = curves[key]
                ax.plot(epochs, values, marker=".", color=PALETTE[i % len(PALETTE)], label=label, gid=f"{label}|{key}")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)" if "acc" in key else "loss")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def attention_grid(images: np.ndarray, teacher_maps: Mapping[str, np.ndarray],
                   student_maps: Mapping[str, np.ndarray]) -> Figure:
    """Rows: inputs; columns: the input, then teacher and student attention at each layer pair.

    ``images`` is (B, H, W) or (B, C, H, W); each map array is (B, h, w). The teacher and
    student dicts are paired in order (their layer names may differ).
    """
    images = np.asarray(images, dtype=float)
    if images.ndim == 4:
        images = images.transpose(0, 2, 3, 1)
        images = images[..., 0] if images.shape[-1] == 1 else images
    if len(teacher_maps) != len(student_maps):
        raise ValueError(f"{len(teacher_maps)} teacher layers but {len(student_maps)} student layers: pair them one to one")
    pairs = list(zip(teacher_maps.items(), student_maps.items()))
    batch = images.shape[0]
    cols = 1 + 2 * len(pairs)
    fig = Figure(figsize=(1.6 * cols, 1.7 * batch + 0.4), layout="constrained")
    axes = fig.subplots(batch, cols, squeeze=False)
    for row in range(batch):
        image = images[row]
        image = (image - image.min()) / max(image.max() - image.min(), 1e-12)
        axes[row, 0].imshow(image, cmap="gray" if image.ndim == 2 else None, gid=f"input:{row}")
        for j, ((t_name, t_map), (s_name, s_map)) in enumerate(pairs):
            for k, (who, name, maps) in enumerate((("teacher", t_name, t_map), ("student", s_name, s_map))):
                ax = axes[row, 1 + 2 * j + k]
                ax.imshow(np.asarray(maps[row], dtype=float), cmap="jet", gid=f"{who}:{name}:{row}")
                if row == 0:
                    ax.set_title(f"{who}\n{name}", fontsize="small")
    axes[0, 0].set_title("input", fontsize="small")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def attention_maps(model, x, layers: Sequence[str], p: float = 2) -> dict[str, np.ndarray]:
    """AT attention maps (channel mean of |f|^p, l2-normalised) of ``model`` at ``layers`` for inputs ``x``.

    Features come from :func:`featkd.capture` (forward hooks) and the map from
    :func:`featkd.functional.attention_map`, so a figure shows exactly what AT matches.
    Returns ``{layer: (B, H, W) array}``.
    """
    import torch

    from featkd.hooks import capture
    from featkd.functional import attention_map

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, list(layers)) as feats:
            model(x)
            maps = {}
            for name in layers:
                f = feats[name]
                maps[name] = attention_map(f, p).reshape(f.shape[0], *f.shape[2:]).cpu().numpy()
    finally:
        model.train(was_training)
    return maps
