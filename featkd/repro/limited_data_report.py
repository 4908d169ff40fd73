"""The limited-data table's report: its recipes in words, one comparison table per group of methods and,
under each, whether its seeds can see a gain of the published size (:mod:`featkd.stats`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from featkd import published, stats
from featkd.repro.protocols import pretty_model
from featkd.repro.recipes import RecipeSpec

if TYPE_CHECKING:  # the report reads a setup; limited_data imports this module
    from featkd.repro.limited_data import LimitedDataSetup

TUNED = "-tuned"  # a method's tuned recipe is named "<method>-tuned" (featkd tune); its baseline "student-tuned"


def comparison_groups(methods: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """``(title, baseline, methods)`` per table: the published recipes against the student alone, and the tuned
    ones (if any) against the tuned student alone, each with its own Holm correction."""
    as_published = [m for m in methods if not m.endswith(TUNED)]
    tuned = [m for m in methods if m.endswith(TUNED)]
    groups = [("published settings", "student", as_published)]
    if tuned:
        if "student" + TUNED not in tuned:
            raise ValueError(f"tuned methods {tuned} need their baseline 'student{TUNED}' (the student alone at its "
                             "tuned length)")
        groups.append(("tuned settings (featkd tune, chosen on the validation images)", "student" + TUNED, tuned))
    return groups


def describe_recipe(spec: RecipeSpec) -> str:
    """A recipe's losses in one line, from its recorded settings."""
    if spec.is_student_alone:
        return "cross-entropy"
    parts = [f"{'CE' if spec.ce_weight == 1 else f'{spec.ce_weight:g}·CE'}"]
    if spec.kd is not None:
        kd = spec.kd_config()
        parts.append(f"{_weight_text(kd.weight)}·{kd.loss}" + "".join(f" {k}={v}" for k, v in kd.options.items()))
    for term in spec.term_configs():
        options = "".join(f" {k}={v}" for k, v in term.options.items())
        parts.append(f"{_weight_text(term.weight)}·{term.loss}({term.teacher}{options})")
    return " + ".join(parts)


def _weight_text(weight) -> str:
    if isinstance(weight, (int, float)):
        return f"{weight:g}"
    if hasattr(weight, "relative_to_ce"):
        return f"[{weight.relative_to_ce:g}× CE's gradient]"
    return str(weight)


def effort_lines(trained_with: Sequence[str], sweep_seconds: float, who: str = "the students") -> list[str]:
    """Which featkd code trained ``who`` (every sweep's environment.json, resumes included), and the process
    time their sweeps took over every invocation (a long run spans several; the wall time is the last one's)."""
    legend = "; +edits: uncommitted edits" if any(code.endswith("+edits") for code in trained_with) else ""
    lines = [f"- code: {who} trained at featkd {', '.join(trained_with)} (each sweep's environment.json, "
             f"every resume included{legend})"] if trained_with else []
    if sweep_seconds:
        lines.append(f"- process time: {sweep_seconds / 60:.1f} min summed over every epoch of the sweeps that trained "
                     f"{who}, every invocation included (the wall time above is this invocation's)")
    return lines


def render_report(setup: LimitedDataSetup, data, train_examples: int, full_size: int,
                  accuracies: dict[str, list[float]], teacher_acc: float, teacher: str, wall_s: float,
                  command: str | None, recipes: Mapping[str, RecipeSpec], measured_on: str,
                  trained_with: Sequence[str] = (), sweep_seconds: float = 0.0) -> str:
    lengths = {name: int(spec.changes.get("epochs", setup.epochs)) for name, spec in recipes.items()}
    def kept(name, spec):  # a tuned recipe that trains as the published one: its row is the published row
        base = name[:-len(TUNED)]
        return name.endswith(TUNED) and base in recipes and spec.trains_as(recipes[base], setup.epochs)

    recipe_lines = [f"  - {name} ({lengths[name]} epochs): {describe_recipe(spec)}"
                    + (f" — tuned: {dict(spec.changes)}" if spec.changes else f" — {spec.source}" if spec.source else "")
                    + (f" (trains as {name[:-len(TUNED)]}: the same students, not trained twice)"
                       if kept(name, spec) else "")
                    for name, spec in recipes.items()]
    return "\n".join([
        f"# Limited data: {pretty_model(setup.student)} students on {setup.fraction:.0%} of {data.label} "
        f"({train_examples} of {full_size} training images), {pretty_model(teacher)} teacher trained on all "
        "of them",
        "",
        f"- command: `{command or 'featkd repro limited-data'}`",
        f"- students: batch {setup.batch_size}, SGD lr 0.1 momentum 0.9 (restarted at each decay) wd 5e-4, lr ×0.2 "
        "at 30/60/80% of the epochs, WRN BN weights ~ U[0, 1), pad-4 reflection crop + flip, the last batch kept; "
        f"evaluated on {_evaluation_set(setup)}, once, after the last epoch (no model selection)",
        f"- a seed varies the student's class-balanced subset (drawn from the {full_size - setup.validation_size} "
        "training images outside the validation set), the batch order, the augmentation and the initial weights; "
        f"all methods of a seed share them (paired); seeds {list(setup.seeds)}",
        "- recipes (from the recorded settings; every member's config.yaml holds its recipe in full):",
        *recipe_lines,
        f"- hardware: {measured_on}; torch {torch.__version__}; wall time {wall_s / 60:.1f} min",
        *effort_lines(trained_with, sweep_seconds),
        "",
        *comparison_tables(accuracies, setup.seeds, teacher_acc,
                           "validation accuracy %" if setup.on_validation else "test accuracy %"),
        stats.INTERVAL_NOTE,
        "",
    ])


PUBLISHED_GAINS_NOTE = ("Can these seeds see a gain of the published size? (80% power at 5% two-sided, at each row's "
                        "measured spread; the published gains were measured on CIFAR, not on this data.)")


def comparison_tables(accuracies: Mapping[str, list[float]], seeds, teacher_acc: float, metric: str) -> list[str]:
    """One Markdown table per :func:`comparison_groups` group, each with its title and, below it, each method's
    published gain set against the smallest Δ its seeds detect (:func:`featkd.stats.reference_effect_lines`)."""
    lines = []
    for title, baseline, names in comparison_groups(list(accuracies)):
        group = {name: accuracies[name] for name in names}
        against = stats.reference_effect_lines(group, published.gain, baseline)
        lines += [f"### {title}", "",
                  stats.comparison_table(group, seeds, baseline=baseline, teacher=teacher_acc, metric=metric), "",
                  *([PUBLISHED_GAINS_NOTE, *against, ""] if against else [])]
    return lines


def _evaluation_set(setup: LimitedDataSetup) -> str:
    if setup.on_validation:
        return (f"the {setup.validation_size} class-balanced validation images of the training split (for choosing "
                "settings; the teacher was trained on them, no student was)")
    return f"the test split ({'all' if setup.test_limit is None else setup.test_limit} images)"
