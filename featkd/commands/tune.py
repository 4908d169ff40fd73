"""``featkd tune``: choose every method's settings on validation images, with the same budget for each.

    featkd tune --fraction 0.01 --run-dir runs/tune --out paper_repro/tuning/limited-data-0.01.yaml

The limited-data students (WRN-16-1 ← the shipped WRN-16-2 on a share of Fashion-MNIST) of every method
in ``featkd/configs/tuning/limited_data.yaml`` — the published recipe and grid points of training length,
weight (relative to the cross-entropy), KD temperature, NST bandwidth — are trained on tuning seeds and
scored on the validation images (training images no student trains on; the test split is never read);
successive halving over seeds gives each method the same budget. Writes the report (every candidate,
every rung, with intervals) next to the run directory and the chosen settings with their provenance to
``--out``, which ``featkd repro limited-data --tuned FILE`` and ``featkd demo`` read. Runs resume:
finished sweeps are reused, an interrupted one continues.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from featkd.commands._common import add_sweep_process_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fraction", type=float, default=0.01, help="students' share of the training split (0.01)")
    parser.add_argument("--methods", nargs="+", help="tune only these methods (the student alone is always tuned)")
    parser.add_argument("--space", type=Path, help="a tuning space YAML (default: featkd/configs/tuning/limited_data.yaml)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher checkpoint (default: the shipped WRN-16-2, its hash checked)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tune"),
                        help="where the sweeps and the report go (default: runs/tune); the same command again continues "
                             "an interrupted tuning: finished sweeps are read back, interrupted ones resume")
    parser.add_argument("--out", type=Path, required=True, help="the chosen settings (YAML; must not exist)")
    parser.add_argument("--validation-size", type=int, default=5000, metavar="N",
                        help="training images set aside to score the candidates on (default 5000)")
    parser.add_argument("--data", default="fashion_mnist",
                        help="dataset: fashion_mnist (default), or synthetic for a seconds-long check with --teacher")
    parser.add_argument("--student", default="wrn16_1", help="student model (default wrn16_1)")
    parser.add_argument("--batch-size", type=int, default=64, help="students' batch size (default 64)")
    parser.add_argument("--device", default="auto")
    add_sweep_process_arguments(parser)


def _command_line(args: argparse.Namespace) -> str:
    """The command that repeats this tuning, from the parsed arguments (so it is right however it was called)."""
    parts = ["featkd tune", "--fraction", f"{args.fraction:g}"]
    if args.methods:
        parts += ["--methods", *args.methods]
    for flag in ("space", "teacher", "run_dir", "out", "validation_size", "data", "student", "batch_size", "device", "jobs",
                 "max_sweep_work"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))


def run(args: argparse.Namespace) -> int:
    from featkd.commands._common import reports_user_errors

    return reports_user_errors(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from featkd import shipped
    from featkd.config import ConfigError
    from featkd.repro import DataSpec
    from featkd.repro.cache import write_new
    from featkd.repro.limited_data import LimitedDataSetup
    from featkd.repro.tuning import TuningSpace, run_tuning, tuning_json, write_choice

    if args.out.exists():
        raise ConfigError(f"--out {args.out} already exists; give a new file (a tuning choice is never overwritten)")
    space = TuningSpace.load(path=args.space)
    if args.methods:
        space = space.restricted(args.methods)
    command = _command_line(args)
    setup = LimitedDataSetup(fraction=args.fraction, epochs=space.epochs[0], batch_size=args.batch_size,
                             student=args.student, validation_size=args.validation_size, evaluate_on="validation",
                             methods=tuple(space.methods), seeds=tuple(space.seeds), jobs=args.jobs,
                             max_sweep_work=args.max_sweep_work)
    teacher, shipped_teacher = (args.teacher, None) if args.teacher else (shipped.TEACHER.path, shipped.TEACHER)
    result = run_tuning(teacher, setup, space, args.run_dir, data=DataSpec(args.data), device=args.device,
                        shipped=shipped_teacher, command=command)
    stem = f"tune-{setup.name(DataSpec(args.data))}"  # the name holds the share's dot: no with_suffix
    write_new(args.run_dir / f"{stem}.md", result.markdown + "\n")
    write_new(args.run_dir / f"{stem}.json", tuning_json(result))
    # the report also goes beside the choice (-report.md, -report.json), which records it: committed together,
    # the choice's provenance can be read where the choice is
    base = args.out.with_name(args.out.name.rsplit(".", 1)[0] + "-report")
    report = write_new(base.with_name(base.name + ".md"), result.markdown + "\n")
    write_new(base.with_name(base.name + ".json"), tuning_json(result))
    out = write_choice(result, args.out, setup=setup, teacher_path=teacher, report=report, command=command)
    print(result.markdown)
    print(f"report: {report}; chosen settings: {out}")
    return 0
