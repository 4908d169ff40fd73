"""Sweep throughput: N students against one shared teacher forward vs N separate runs.

Both sides train the same N members (WRN students with AT / NST-poly / KD terms, cycled) on the same
batches, measured side by side in one process with the repetitions interleaved (separate, sweep,
separate, sweep, ...) so that load from other processes hits both alike:

* separate -- N ``featkd.engine.DistillMethod`` steps, each Distiller running its own teacher forward
              (what N separate ``featkd distill`` runs do per batch);
* sweep    -- one ``featkd.sweep.SweepMethod`` step: one teacher forward, N student steps.

Reported: images per second (batch × N students per step time), median over repeats, and the ratio.
Data loading and evaluation are the same for both and are left out.

    python benchmarks/sweep_throughput.py                  # the committed table (CPU, ~3 min)
    python benchmarks/sweep_throughput.py --quick          # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featkd.repro.report import hardware  # noqa: E402
from featkd import sweep  # noqa: E402
from featkd.distiller import Distiller, Term  # noqa: E402
from featkd.engine import DistillMethod, build_optimizer, seed_everything  # noqa: E402
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
        student = create_model(student_name, num_classes=num_classes, in_channels=x.shape[1])
        distiller = Distiller(teacher, student, **RECIPES[i % len(RECIPES)][1]).setup(x[:2])
        built.append((distiller, build_optimizer(distiller.trainable_parameters(), lr=0.05)))
    return built


def time_steps(step, batches, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for x, y in batches:
            step(x, y)
        times.append((time.perf_counter() - started) / len(batches))
    return times


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
    parser.add_argument("--quick", action="store_true", help="N in (1, 2), one repeat of one step")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.steps, args.repeats = [1, 2], 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    num_classes = 10
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, args.image_size, args.image_size, generator=generator),
                torch.randint(0, num_classes, (args.batch_size,), generator=generator)) for _ in range(args.steps)]
    seed_everything(100)
    teacher = create_model(args.teacher, num_classes=num_classes, in_channels=1)

    lines = [
        "# Sweep throughput: one shared teacher forward vs N separate runs",
        "",
        f"teacher {args.teacher}, students {args.student} (recipes cycled: {', '.join(r for r, _ in RECIPES)}), "
        f"batch {args.batch_size} of 1×{args.image_size}×{args.image_size}, {args.steps} steps × {args.repeats} "
        f"interleaved repeats, median. Device: {hardware()} ("
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}.",
        "",
        "| N students | separate: student-img/s | sweep: student-img/s | sweep / separate |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in args.members:
        separate_methods = [DistillMethod(d, o) for d, o in build(teacher, n, args.student, batches[0][0], num_classes)]
        shared = sweep.SharedTeacherOutputs()
        members = [sweep.make_member(f"m{i}", d, o, shared=shared)
                   for i, (d, o) in enumerate(build(teacher, n, args.student, batches[0][0], num_classes))]
        sweep_method = sweep.SweepMethod(teacher, members, shared)

        def separate_step(x, y):
            for method in separate_methods:
                method.train_step(x, y, 0)

        def sweep_step(x, y):
            sweep_method.train_step(x, y, 0)

        separate_step(*batches[0])  # warm-up
        sweep_step(*batches[0])
        t_separate, t_sweep = [], []
        for _ in range(args.repeats):
            t_separate += time_steps(separate_step, batches, 1)
            t_sweep += time_steps(sweep_step, batches, 1)
        images = args.batch_size * n
        separate_rate = images / statistics.median(t_separate)
        sweep_rate = images / statistics.median(t_sweep)
        line = f"| {n} | {separate_rate:.1f} | {sweep_rate:.1f} | {sweep_rate / separate_rate:.2f}× |"
        lines.append(line)
        print(line, flush=True)
        sweep_method.close()
        for method in separate_methods:
            method.distiller.remove_hooks()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n\nCommand: `python benchmarks/sweep_throughput.py "
                            + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
