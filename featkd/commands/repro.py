"""``featkd repro <protocol> --budget cpu|short|full``: one paper table per command.

Protocols: ``at-table1`` (AT paper, Table 1), ``nst-kernels`` (NST with each kernel, alone and with
KD), ``omitted-class`` (Hinton et al. 2015), ``limited-data`` (students on a small share of the data,
every method paired by seed against the student alone; ``--fraction``, ``--teacher``). Fashion-MNIST unless ``--cifar10 PATH`` is given; the
report always says which. Teachers and finished sweeps in ``--run-dir`` are reused, never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import shlex
import sys
from pathlib import Path

from featkd.commands._common import add_sweep_process_arguments, positive_int

PROTOCOL_NAMES = ("at-table1", "nst-kernels", "omitted-class", "limited-data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("protocol", help=f"one of: {', '.join(PROTOCOL_NAMES)}")
    parser.add_argument("--budget", default="cpu", choices=("cpu", "short", "full"),
                        help="cpu: minutes on a 2-core CPU (subset, few epochs, 2 seeds, first pair); short: the "
                             "protocol with fewer epochs (minutes on a GPU); full: the paper's schedule (GPU)")
    parser.add_argument("--cifar10", metavar="PATH", default=None,
                        help="run on CIFAR-10 from this folder (cifar-10-batches-py or its parent); "
                             "default: Fashion-MNIST")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/repro"),
                        help="where teachers, sweeps and reports go (default: runs/repro); finished runs are reused, "
                             "interrupted ones resume; a limited-data table given more --methods trains only the new ones")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    over = parser.add_argument_group("budget overrides")
    over.add_argument("--epochs", type=positive_int, help="student epochs")
    over.add_argument("--teacher-epochs", type=int)
    over.add_argument("--seeds", type=int, nargs="+")
    over.add_argument("--train-limit", type=int, help="class-balanced training subset size (0: the whole split)")
    over.add_argument("--test-limit", type=int, help="class-balanced test subset size (0: the whole split)")
    over.add_argument("--pairs", type=int, help="run the first N pairs of the protocol")
    over.add_argument("--methods", nargs="+", help="run only these methods (the student baseline is always run)")
    limited = parser.add_argument_group("limited-data")
    limited.add_argument("--fraction", type=float, default=0.03,
                         help="students' class-balanced share of the training split (default 0.03)")
    limited.add_argument("--teacher", type=Path, default=None,
                         help="teacher checkpoint (default: the shipped Fashion-MNIST WRN-16-2, its hash and accuracy checked)")
    limited.add_argument("--validation", action="store_true",
                         help="evaluate on the validation images (class-balanced training images no student trains "
                              "on) instead of the test split, which is then not read: for choosing settings")
    limited.add_argument("--validation-size", type=int, default=5000, metavar="N",
                         help="training images set aside as the validation set (default 5000)")
    add_sweep_process_arguments(limited)
    limited.add_argument("--tuned", type=Path, metavar="FILE",
                         help="also train each method's tuned recipe (a featkd tune --out file), as <method>-tuned, "
                              "compared with the student alone at its tuned length")
    limited.add_argument("--tuned-only", action="store_true",
                         help="with --tuned: train the tuned recipes and the student alone, not the other published "
                              "ones (their table was made before with the same seeds; the student, trained again, "
                              "must equal its row there)")


def _budget(base, args):
    changes = {}
    for field in ("epochs", "teacher_epochs", "pairs"):
        if getattr(args, field) is not None and hasattr(base, field):
            changes[field] = getattr(args, field)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    for field in ("train_limit", "test_limit"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = value or None
    if args.methods and hasattr(base, "methods"):
        changes["methods"] = tuple(dict.fromkeys(["student", *args.methods]))
    return dataclasses.replace(base, **changes)


def run(args: argparse.Namespace) -> int:
    from featkd.commands._common import reports_user_errors

    return reports_user_errors(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from featkd import repro

    if args.protocol not in PROTOCOL_NAMES:
        close = difflib.get_close_matches(args.protocol, PROTOCOL_NAMES, n=2)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"featkd repro: unknown protocol {args.protocol!r}.{hint} Known: {', '.join(PROTOCOL_NAMES)}",
              file=sys.stderr)
        return 2
    data = repro.DataSpec("cifar10", args.cifar10) if args.cifar10 else repro.DataSpec("fashion_mnist")
    command = "featkd repro " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    if args.protocol == "limited-data":
        result = _limited_data(args, command)
    elif args.protocol == "omitted-class":
        budget = _budget(repro.OMITTED_BUDGETS[args.budget], args)
        result = repro.run_omitted_class(budget, data, args.run_dir, device=args.device, command=command)
    else:
        protocol = repro.PROTOCOLS[args.protocol]
        budget = _budget(protocol.budgets[args.budget], args)
        known = {r.name for r in protocol.recipes}
        unknown = [m for m in budget.methods or () if m not in known]
        if unknown:
            print(f"featkd repro: unknown method(s) {unknown} for {protocol.name}; known: {sorted(known)}",
                  file=sys.stderr)
            return 2
        result = repro.run_protocol(protocol, budget, data, args.run_dir, device=args.device, command=command)
    print()
    print(result.markdown)
    return 0


def _limited_data(args, command):
    from featkd import shipped
    from featkd.repro import limited_data

    changes = {k: v for k, v in (("epochs", args.epochs), ("test_limit", args.test_limit or None)) if v is not None}
    changes.update(validation_size=args.validation_size, evaluate_on="validation" if args.validation else "test",
                   jobs=args.jobs, max_sweep_work=args.max_sweep_work)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.methods:
        changes["methods"] = tuple(dict.fromkeys(["student", *args.methods]))
    recipes = dict(limited_data.RECIPES)
    if args.tuned_only and not args.tuned:
        raise ValueError("--tuned-only needs --tuned FILE (the choice a featkd tune --out wrote)")
    if args.tuned:
        from featkd.repro.tuning import read_choice

        chosen, _ = read_choice(args.tuned)
        recipes, changes["methods"] = limited_data.with_tuned(changes.get("methods", tuple(recipes)), chosen,
                                                               tuned_only=args.tuned_only)
    setup = limited_data.LimitedDataSetup(fraction=args.fraction, epochs=changes.pop("epochs", 20), **changes)
    teacher, shipped_teacher = (args.teacher, None) if args.teacher else (shipped.TEACHER.path, shipped.TEACHER)
    return limited_data.run_limited_data(teacher, setup, args.run_dir, device=args.device, command=command,
                                         shipped=shipped_teacher, recipes=recipes)
