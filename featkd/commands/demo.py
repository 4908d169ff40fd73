"""``featkd demo``: the README's main job — does feature distillation help, and by how much?

Hinton's limited-data regime on Fashion-MNIST: the shipped WRN-16-2 teacher, trained on all 60 000
training images (its sha256 and test accuracy are checked first; ``--retrain-teacher`` makes it
again), and WRN-16-1 students that see a class-balanced 1% of them for 30 epochs — alone, with AT and with
NST (the reference code's polynomial kernel), each at its published setting and at the setting
``featkd tune`` chose on held-out training images within the demo's budget (:data:`TUNED_CHOICE`), 5 seeds
(a seed draws the subset, the batch order, the augmentation and the initial weights). The share and
length were chosen on held-out training images, never on the test set (:data:`SELECTION`).
Prints each method's test accuracy with its 95% interval and its Δ vs the student alone, paired by
seed, marking the differences beyond the noise (Holm-corrected; "too few seeds" below 3); writes the Δ plots (PNG +
PDF) and a Markdown report. A run directory made with the same settings is reused (finished students are
loaded, an interrupted run resumes); one made with other settings is left alone and a new
``runs/demo-2`` (-3, ...) is used. KD, FitNets, Gram and the patient schedules are in ``paper_repro/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from featkd.commands._common import positive_int
from featkd.shipped import REPO_ROOT

# The student alone and the two papers' methods, each at its published setting and tuned: what fits in
# 12 minutes on 2 cores (5 students a seed; a tuned recipe the tuning left as published is not trained twice).
# KD, FitNets and Gram, with the patient schedules a demo cannot afford, are in paper_repro/.
DEMO_METHODS = ("student", "AT", "NST-poly")
# The share and length, chosen before featkd tune existed; rule, set before either candidate ran: keep the
# one whose feature-transfer Δ has the largest lower 95% bound on 5000 held-out training images. 1% × 30
# epochs: FitNet +2.79 ± 0.43, NST-poly +0.70 ± 0.81; 3% × 10 epochs: FitNet +2.73 ± 0.81, NST-poly
# +0.11 ± 1.47 (paper_repro/results/selection/, with the earlier 3-epoch teacher).
SELECTION = {"fraction": 0.01, "epochs": 30}
# The tuned settings the demo shows next to the published ones: written by featkd tune with the demo's space
# (featkd/configs/tuning/limited_data_demo.yaml: the demo's 30 epochs; its provenance inside).
TUNED_CHOICE = REPO_ROOT / "paper_repro" / "tuning" / "limited-data-0.01-demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                        help="run directory (default: runs/demo; reused if made with the same settings)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke version: synthetic data, a teacher trained in place, 2 seeds")
    parser.add_argument("--fraction", type=float, default=None, help="students' share of the data (default 0.01)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="student epochs (default 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default 0 1 2 3 4)")
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="train the teacher from scratch with its recorded command instead of the shipped one")
    parser.add_argument("--tuned", type=Path, metavar="FILE",
                        help="the tuned settings to show next to the published ones (default: the committed "
                             "paper_repro/tuning/limited-data-0.01.yaml; written by featkd tune --out FILE)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                        help="train the seeds' sweeps in N processes of one torch thread each (default: 2 on a "
                             "CPU, see benchmarks/parallel_sweeps.py; 1 on a GPU or with --tiny)")


def demo_setup(args):
    from featkd.repro.limited_data import LimitedDataSetup

    if args.tiny:
        base = LimitedDataSetup(fraction=0.03, epochs=1, seeds=(0, 1), methods=DEMO_METHODS, batch_size=16,
                                test_limit=100, student="wrn10_1", validation_size=200)
    else:
        # About 11 minutes on an idle 2-core CPU: 25 students, 270 steps each, one evaluation.
        base = LimitedDataSetup(**SELECTION, seeds=(0, 1, 2, 3, 4), methods=DEMO_METHODS)
    changes = {k: v for k, v in (("fraction", args.fraction), ("epochs", args.epochs)) if v is not None}
    changes["jobs"] = args.jobs or (1 if args.tiny or _on_gpu(args.device) else 2)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return dataclasses.replace(base, **changes)


def _on_gpu(device: str) -> bool:
    from featkd.engine import resolve_device

    return resolve_device(device).type != "cpu"


def choose_run_dir(run_dir: Path, settings: dict) -> tuple[Path, bool]:
    """``run_dir`` if it is new or holds a demo with these settings, else the first free ``run_dir-N``.
    Returns the directory and whether it is being reused."""
    candidate, k = run_dir, 2
    while True:
        stamp = candidate / "demo.json"
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return candidate, False
        if stamp.is_file() and _read_stamp(stamp) == settings:
            return candidate, True
        candidate, k = run_dir.with_name(f"{run_dir.name}-{k}"), k + 1


def _read_stamp(stamp: Path):
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None  # unreadable: treated as another demo's directory, left alone


def _teacher(args, run_dir: Path):
    """(checkpoint path, the shipped teacher's record or None when it is trained here) of the teacher to use."""
    from featkd import runs, shipped

    if args.tiny or args.retrain_teacher:
        # The shipped file was made the same way: the train command's last.pt, exported without the
        # optimiser and RNG states (shipped.export_teacher).
        teacher_dir, exported = run_dir / "teacher", run_dir / "teacher.pt"
        if not exported.is_file():
            if not (teacher_dir / "last.pt").is_file():
                overrides = (["model.name=wrn10_2", "epochs=1", "data.name=synthetic", "data.limit=64",
                              "data.test_limit=32", "data.batch_size=16"] if args.tiny else list(shipped.TEACHER.overrides))
                resume = teacher_dir.exists()
                runs.train_model(None if resume else shipped.TEACHER.config, teacher_dir, resume,
                                 [] if resume else overrides)
            shipped.export_teacher(teacher_dir / "last.pt", exported)
        return exported, None
    return shipped.TEACHER.path, shipped.TEACHER


def run(args: argparse.Namespace) -> int:
    from featkd.commands._common import reports_user_errors

    return reports_user_errors(_run)(args)


def _tuned(args, setup):
    """(recipes with the tuned ones added, the methods, the choice's provenance) from ``--tuned`` (default: the
    committed :data:`TUNED_CHOICE`); the published recipes alone when there is no choice to read."""
    from featkd.repro import limited_data
    from featkd.repro.tuning import read_choice

    path = args.tuned or (None if args.tiny else TUNED_CHOICE)
    recipes = dict(limited_data.RECIPES)
    if path is None or not Path(path).is_file():
        if args.tuned:
            raise FileNotFoundError(f"--tuned {args.tuned}: no such file (featkd tune --out FILE writes one)")
        return recipes, setup.methods, None
    chosen, provenance = read_choice(path)
    recipes, methods = limited_data.with_tuned(setup.methods, chosen)
    return recipes, methods, {"file": str(path), **provenance}


def _run(args: argparse.Namespace) -> int:
    from featkd import plots, repro, shipped, stats
    from featkd.repro import limited_data, limited_data_report

    started = time.perf_counter()
    setup = demo_setup(args)
    recipes, methods, provenance = _tuned(args, setup)
    setup = dataclasses.replace(setup, methods=methods)
    data = repro.DataSpec("synthetic") if args.tiny else repro.DataSpec("fashion_mnist")
    settings = {"data": data.name, "retrain_teacher": args.retrain_teacher, "teacher_sha256": shipped.TEACHER.sha256,
                "tuned": provenance,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(setup).items()}}
    run_dir, reused = choose_run_dir(args.run_dir, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    student = repro.pretty_model(setup.student)
    print(f"featkd demo: {student} students on {setup.fraction:.0%} of {data.label}, {len(setup.seeds)} seeds, "
          f"{setup.epochs} epochs; run directory {run_dir}" + (" (reusing finished parts)" if reused else ""))
    if provenance:
        print(f"tuned settings from {provenance['file']} ({provenance.get('command')}, {provenance.get('date')}; "
              f"report {provenance.get('report')}):")
        tuned = limited_data_report.TUNED
        for name in methods:
            if name.endswith(tuned):
                print(f"  {name}: {dict(recipes[name].changes)}; published: {recipes[name[:-len(tuned)]].source}")
    else:
        print("no tuned settings to show: `featkd tune --out FILE` writes them, `featkd demo --tuned FILE` reads them")
    teacher_path, shipped_teacher = _teacher(args, run_dir)
    result = limited_data.run_limited_data(teacher_path, setup, run_dir, data=data, device=args.device,
                                           command="featkd demo" + (" --tiny" if args.tiny else ""),
                                           shipped=shipped_teacher, recipes=recipes)
    plotted = []
    for title, baseline, names in limited_data_report.comparison_groups(methods):
        stem = run_dir / ("paired_deltas" if baseline == "student" else "paired_deltas-tuned")
        plotted.append(stem)
        if not stem.with_suffix(".png").exists():
            fig = plots.paired_deltas({name: result.accuracies[name] for name in names}, baseline=baseline,
                                      teacher=result.teacher_acc,
                                      title=f"{student} ← {result.teacher_name}, {setup.fraction:.0%} of {data.label}, "
                                            f"{title}: Δ vs {baseline}, mean ± 95% CI over {len(setup.seeds)} seeds")
            plots.save_figure(fig, stem)
    wall = time.perf_counter() - started
    print()
    print(f"## {student} ← {result.teacher_name}, students on {result.train_examples} {data.label} images "
          "(test accuracy after the last epoch; a seed draws the subset, batches, augmentation and initial weights)")
    print()
    print("\n".join(limited_data_report.comparison_tables(result.accuracies, setup.seeds, result.teacher_acc,
                                                          "test accuracy %")))
    print(stats.INTERVAL_NOTE)
    print("plots: " + ", ".join(f"{stem.with_suffix('.png')} (.pdf)" for stem in plotted))
    print(f"hardware: {result.measured_on}; wall time {wall / 60:.1f} min")
    return 0
