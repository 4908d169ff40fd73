"""Sweep throughput: N students one by one, against one shared teacher forward, and fused into one computation.

Every side trains the same N members (WRN students with AT / NST-poly / KD terms, cycled) on the same
batches, measured side by side in one process with the repetitions interleaved (separate, sweep, fused,
separate, ...) so that load from other processes hits all alike:

* separate -- N ``featkd.engine.DistillMethod`` steps, each Distiller running its own teacher forward
              (what N separate ``featkd distill`` runs do per batch);
* sweep    -- one ``featkd.sweep.SweepMethod`` step: one teacher forward, N student steps;
* fused    -- one ``featkd.fused.FusedSweepMethod`` step: one teacher forward, the N students as one
              batched forward and backward, N optimiser steps (``--fused-only`` skips the other two).

Reported: student-images per second (batch × N students / step time), median over repeats, and the ratios.
Data loading and evaluation are the same for all and are left out. On CUDA every timed repeat ends with
a synchronisation, and ``--amp bf16`` runs every side under bf16 autocast.

    python benchmarks/sweep_throughput.py                  # the committed CPU table (~3 min)
    python benchmarks/sweep_throughput.py --quick          # seconds
    python benchmarks/sweep_throughput.py --device cuda --members 1 2 4 8 16 --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import sync, write_markdown  # noqa: E402
from featkd.repro.report import hardware  # noqa: E402
from featkd import sweep  # noqa: E402
from featkd.distiller import Distiller, Term  # noqa: E402
from featkd.engine import DistillMethod, Precision, build_optimizer, seed_everything  # noqa: E402
from featkd.fused import FusedSweepMethod  # noqa: E402
from featkd.models import create_model  # noqa: E402

GROUPS = ("group1", "group2", "group3")
RECIPES = [
    ("at", dict(terms=[Term(g, loss="at", weight=1e3) for g in GROUPS])),
    ("nst-poly", dict(terms=[Term("group3", loss="nst", weight=50, options={"kernel": "poly"})])),
    ("kd", dict(kd={"loss": "kd", "weight": 0.9, "T": 4}, ce_weight=0.1)),
]


def build(teacher, n, student_name, x, num_classes):
    """N (distiller, optimizer) pairs, recipes cycled, seeded by index."""
    built = []
    for i in range(n):
        seed_everything(i)
        student = create_model(student_name, num_classes=num_classes, in_channels=x.shape[1]).to(x.device)
        distiller = Distiller(teacher, student, **RECIPES[i % len(RECIPES)][1]).setup(x[:2])
        built.append((distiller, build_optimizer(distiller.trainable_parameters(), lr=0.05)))
    return built


def time_steps(step, batches, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for x, y in batches:
            step(x, y)
        sync(device)
        times.append((time.perf_counter() - started) / len(batches))
    return times


def sides(teacher, n, args, batches, num_classes, precision):
    """{side: (step function, cleanup)} for the N members on each side."""
    x = batches[0][0]
    built = {}
    if not args.fused_only:
        separate = [DistillMethod(d, o, precision=precision) for d, o in build(teacher, n, args.student, x, num_classes)]
        built["separate"] = (lambda x, y: [m.train_step(x, y, 0) for m in separate],
                             lambda: [m.distiller.remove_hooks() for m in separate])
    for side, method_class in (("sweep", sweep.SweepMethod), ("fused", FusedSweepMethod)):
        if args.fused_only and side == "sweep":
            continue
        shared = sweep.SharedTeacherOutputs()
        members = [sweep.make_member(f"m{i}", d, o, shared=shared, precision=precision)
                   for i, (d, o) in enumerate(build(teacher, n, args.student, x, num_classes))]
        options = {"compile": {"mode": args.compile}} if side == "fused" and args.compile else {}
        method = method_class(teacher, members, shared, **options)
        built[side] = (lambda x, y, method=method: method.train_step(x, y, 0), method.close)
    return built


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="wrn16_2")
    parser.add_argument("--student", default="wrn16_1")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=2, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast on every side")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile the fused students' forward with this mode (default, reduce-overhead)")
    parser.add_argument("--fused-only", action="store_true", help="time the fused side alone")
    parser.add_argument("--quick", action="store_true", help="N in (1, 2), one repeat of one step")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.steps, args.repeats = [1, 2], 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = Precision(args.amp, device)
    num_classes = 10
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, args.image_size, args.image_size, generator=generator).to(device),
                torch.randint(0, num_classes, (args.batch_size,), generator=generator).to(device))
               for _ in range(args.steps)]
    seed_everything(100)
    teacher = create_model(args.teacher, num_classes=num_classes, in_channels=1).to(device)
    names = ["fused"] if args.fused_only else ["separate", "sweep", "fused"]

    lines = [
        "# Sweep throughput: N students one by one, with one shared teacher forward, and fused",
        "",
        f"teacher {args.teacher}, students {args.student} (recipes cycled: {', '.join(r for r, _ in RECIPES)}), "
        f"batch {args.batch_size} of 1×{args.image_size}×{args.image_size}, {args.steps} steps × {args.repeats} "
        f"interleaved repeats, median; autocast {args.amp or 'off'}, fused forward compiled: {args.compile or 'no'}. "
        f"Device: {hardware()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}.",
        "",
        "| N students | " + " | ".join(f"{name}: student-img/s" for name in names)
        + ("" if args.fused_only else " | sweep / separate | fused / separate | fused / sweep") + " |",
        "|---|" + "---|" * (len(names) + (0 if args.fused_only else 3)),
    ]
    print("\n".join(lines), flush=True)
    notes: set[str] = set()
    for n in args.members:
        built = sides(teacher, n, args, batches, num_classes, precision)
        failed = {}
        for name, (step, _) in built.items():  # warm-up (and compilation); a side that cannot run is reported
            try:
                for _ in range(2):
                    step(*batches[0])
            except RuntimeError as error:
                failed[name] = str(error).splitlines()[0]
        times = {name: [] for name in built if name not in failed}
        for _ in range(args.repeats):
            for name in times:
                times[name] += time_steps(built[name][0], batches, 1, device)
        rate = {name: args.batch_size * n / statistics.median(t) for name, t in times.items()}
        cells = [f"{rate[name]:.1f}" if name in rate else "fails" for name in names]
        notes.update(f"{name} fails: {reason}" for name, reason in failed.items())
        if failed and not args.fused_only:
            cells += ["—"] * 3
        elif not args.fused_only:
            cells += [f"{rate['sweep'] / rate['separate']:.2f}×", f"{rate['fused'] / rate['separate']:.2f}×",
                      f"{rate['fused'] / rate['sweep']:.2f}×"]
        line = f"| {n} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
        for _, close in built.values():
            close()
    for note in sorted(notes):
        lines.append(f"\n- {note}")
        print(lines[-1], flush=True)
    if args.out:
        write_markdown(args.out, lines, "sweep_throughput.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
