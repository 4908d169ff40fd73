"""``featkd demo``: the README's main job — a small, real distillation comparison on Fashion-MNIST.

A WRN-16-2 teacher, then WRN-16-1 students trained alone, with KD, with AT and with NST under each
kernel (linear, polynomial, Gaussian), all students of one seed sharing the teacher's forward
(``featkd.sweep``). Prints the table, writes the kernel-ablation plot (PNG + PDF) and a Markdown
report into the run directory. An existing run directory made with the same settings is reused
(finished teacher and students are loaded, an interrupted run resumes); one made with other settings
is left alone and a new ``runs/demo-2`` (-3, ...) is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

DEMO_RECIPES = ("student", "KD", "AT", "NST-linear", "NST-poly", "NST-gaussian")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                        help="run directory (default: runs/demo; reused if made with the same settings)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke version: synthetic data, WRN-10 models, one short epoch")
    parser.add_argument("--train-limit", type=int, default=None, help="training examples (default 8000)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1)")
    parser.add_argument("--device", default="auto")


def demo_protocol(tiny: bool):
    from featkd import repro

    recipes = {
        "student": repro._recipe("student"),
        "KD": repro._recipe("KD", kd=repro.AT_KD, ce_weight=0.1),
        "AT": repro._recipe("AT", repro._at_terms),
        **{f"NST-{k}": repro._recipe(f"NST-{k}", repro._nst_terms(k, "last")) for k in ("linear", "poly", "gaussian")},
    }
    pair = repro.Pair("wrn10_1", "wrn10_2") if tiny else repro.Pair("wrn16_1", "wrn16_2")
    return repro.Protocol(
        name="demo", title="featkd demo: KD, AT and NST kernels against the student alone",
        pairs=(pair,), recipes=tuple(recipes[name] for name in DEMO_RECIPES), budgets={},
        published_note="none (a demo on Fashion-MNIST; see paper_repro/ for the papers' protocols)")


def demo_budget(args):
    from featkd import repro

    if args.tiny:
        base = repro.Budget("tiny", 1, 1, (0,), batch_size=32, train_limit=64, test_limit=32)
    else:
        # About 10 minutes on an idle 2-core CPU (2 torch threads): the teacher about 2, the 12 students
        # (6 methods x 2 seeds, one shared teacher forward per batch) about 8.
        base = repro.Budget("demo", 5, 8, (0, 1), batch_size=64, train_limit=8000, test_limit=2000)
    changes = {k: v for k, v in (("train_limit", args.train_limit), ("epochs", args.epochs)) if v is not None}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return dataclasses.replace(base, **changes)


def choose_run_dir(run_dir: Path, settings: dict) -> tuple[Path, bool]:
    """``run_dir`` if it is new or holds a demo with these settings, else the first free ``run_dir-N``.
    Returns the directory and whether it is being reused."""
    import json

    candidate, k = run_dir, 2
    while True:
        stamp = candidate / "demo.json"
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return candidate, False
        if stamp.is_file() and json.loads(stamp.read_text()) == settings:
            return candidate, True
        candidate, k = run_dir.with_name(f"{run_dir.name}-{k}"), k + 1


def format_table(accuracies: dict[str, list[float]], teacher_acc: float, seeds) -> str:
    from featkd.repro import Stats

    base = Stats.of(accuracies["student"]).mean
    lines = ["| method | test accuracy % (mean ± std) | Δ vs student | per seed " + str(list(seeds)) + " |",
             "|---|---|---|---|"]
    for name, values in accuracies.items():
        s = Stats.of(values)
        delta = "—" if name == "student" else f"{s.mean - base:+.2f}"
        lines.append(f"| {name} | {s.mean:.2f} ± {s.std:.2f} | {delta} | {', '.join(f'{v:.2f}' for v in values)} |")
    lines.append(f"| teacher | {teacher_acc:.2f} | {teacher_acc - base:+.2f} | — |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    from featkd import plots, repro

    started = time.perf_counter()
    protocol, budget = demo_protocol(args.tiny), demo_budget(args)
    data = repro.DataSpec("synthetic") if args.tiny else repro.DataSpec("fashion_mnist")
    pair = protocol.pairs[0]
    settings = {"data": data.name, "teacher": pair.teacher, "student": pair.student,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(budget).items()}}
    run_dir, reused = choose_run_dir(args.run_dir, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"featkd demo: {pair.label} on {data.label}, {budget.describe()}")
    print(f"run directory: {run_dir}" + (" (reusing finished parts)" if reused else ""))
    result = repro.run_protocol(protocol, budget, data, run_dir, device=args.device, command="featkd demo"
                                + (" --tiny" if args.tiny else ""))
    accuracies, teacher_acc = result.accuracies[pair.label], result.teachers[pair.label]

    stem = run_dir / "kernel_ablation"
    if not stem.with_suffix(".png").exists():
        distilled = {k: v for k, v in accuracies.items() if k != "student"}
        fig = plots.kernel_ablation(distilled, student=accuracies["student"], teacher=teacher_acc,
                                    title=f"{pair.label} on {data.label}: test accuracy, "
                                          f"{len(budget.seeds)} seed(s) each")
        plots.save_figure(fig, stem)
    wall = time.perf_counter() - started
    print()
    print(f"## {pair.label} on {data.label} (test accuracy at the last epoch)")
    print()
    print(format_table(accuracies, teacher_acc, budget.seeds))
    print()
    print(f"plot: {stem.with_suffix('.png')} and {stem.with_suffix('.pdf')}")
    print(f"hardware: {repro.hardware()}; wall time {wall / 60:.1f} min")
    return 0
