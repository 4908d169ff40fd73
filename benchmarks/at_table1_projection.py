"""The AT Table 1 protocol on one device: measured epoch times, and the whole protocol's projected time.

For each pair (row) of ``featkd.repro.protocols.AT_TABLE1`` at a budget (``full``: 200 epochs, seeds 0-4;
``short``: 30 epochs, seeds 0-2), on CIFAR-10's shapes (50 000 training images of 3×32×32, 10 000 test
images, batch 128, the protocol's pad-4 reflection crop and flip on the device; the images are synthetic,
since CIFAR-10 cannot be fetched here, and the arithmetic does not depend on their values):

* the teacher's epoch -- its ``SupervisedMethod`` steps as ``featkd repro`` trains it;
* the students' epoch -- every column × seed of the pair at once, built as ``featkd repro`` builds them
  (``featkd.repro.students.build_members``: the paper's optimiser, schedule and initialisation) against one
  teacher forward a step: fused (``FusedSweepMethod``) where the student's forward draws no random numbers,
  else (NIN's dropout) as today's sweep (``SweepMethod``), and that side is named in the table;
* evaluation -- one member's pass over the test images, times the members.

Each step time is the median of ``--steps`` timed steps (after two warm-up steps, data loading included),
scaled to the epoch's steps. The projected protocol time is the teachers' epochs plus the students' epochs of
every pair, each distinct teacher counted once, as ``featkd repro at-table1`` trains it (teachers cached).

    python benchmarks/at_table1_projection.py --device cuda --out results.md
    python benchmarks/at_table1_projection.py --quick          # CPU, two steps of the first pair
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
from featkd import sweep  # noqa: E402
from featkd.data import DeviceLoader, load_dataset  # noqa: E402
from featkd.engine import Precision, SupervisedMethod, evaluate, seed_everything  # noqa: E402
from featkd.fused import RANDOM_OPS, FusedSweepMethod  # noqa: E402
from featkd.models import create_model  # noqa: E402
from featkd.repro.protocols import AT_TABLE1, paper_schedule, protocol_model_options, protocol_train_loader  # noqa: E402
from featkd.repro.report import hardware  # noqa: E402
from featkd.repro.students import build_members  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


def median_step_seconds(step, loader, steps: int, device) -> float:
    """The median time of a training step over ``steps`` batches of ``loader``, after two warm-up steps."""
    batches = iter(loader)
    for _ in range(2):
        step(*next(batches)[:2])
    times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        step(*next(batches)[:2])
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def eval_seconds(model, test_loader, device) -> float:
    evaluate(model, test_loader, device=device)  # warm-up
    sync(device)
    started = time.perf_counter()
    evaluate(model, test_loader, device=device)
    sync(device)
    return time.perf_counter() - started


def students_method(teacher, student_name, recipes, budget, info, train_loader, device, precision):
    """(method, side): the pair's members as ``featkd repro`` builds them, fused where the student allows it."""
    first_batch = [t.to(device) for t in next(iter(train_loader))[:2]]
    for method_class, side in ((FusedSweepMethod, "fused"), (sweep.SweepMethod, "sweep")):
        shared = sweep.SharedTeacherOutputs()
        members = build_members(teacher, student_name, recipes, budget.seeds, info, first_batch, shared, budget,
                                device, {})
        for member in members:
            member.method.precision = precision
        method = method_class(teacher, members, shared)
        try:
            method.train_step(*first_batch, 0)
        except RuntimeError as error:
            if str(error) != RANDOM_OPS:
                raise
            method.close()
            continue
        return method, side
    raise AssertionError("unreachable: the sweep runs any student")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="full", choices=["full", "short"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast (the protocol runs in fp32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--pairs", type=int, default=None, help="only the first PAIRS pairs")
    parser.add_argument("--quick", action="store_true", help="the first pair, 2 timed steps, 2 000 images")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    budget = AT_TABLE1.budgets[args.budget]
    train_size, test_size = (2_000, 500) if args.quick else (TRAIN_IMAGES, TEST_IMAGES)
    if args.quick:
        args.pairs, args.steps = 1, 2
    options = dict(num_classes=10, image_size=32, in_channels=3)
    train = load_dataset("synthetic", split="train", size=train_size, **options)
    test = load_dataset("synthetic", split="test", size=test_size, **options)
    info = train.info
    train_loader = protocol_train_loader(train, budget, device)
    test_loader = DeviceLoader(test, 256, shuffle=False, drop_last=False, device=device)
    steps_per_epoch = -(-TRAIN_IMAGES // budget.batch_size)  # the last, smaller batch is kept
    test_scale = TEST_IMAGES / test_size
    precision = Precision(args.amp, device)
    recipes = AT_TABLE1.recipes

    lines = [
        f"# AT Table 1 on one device: epoch times and the `{budget.name}` protocol's projected time",
        "",
        f"{budget.describe()}; {len(recipes)} columns × {len(budget.seeds)} seeds a pair, CIFAR-10 shapes "
        f"({TRAIN_IMAGES} training images = {steps_per_epoch} steps an epoch, {TEST_IMAGES} test images); "
        f"median of {args.steps} timed steps; autocast {args.amp or 'off (fp32, as the protocol)'}. "
        f"Device: {hardware()}, torch {torch.__version__}.",
        "",
        "| pair | teacher epoch s | students | side | students' epoch s (train + eval) | s / student-epoch |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    teacher_seconds, student_seconds = {}, 0.0
    for pair in AT_TABLE1.pairs[:args.pairs]:
        seed_everything(0)
        teacher = create_model(pair.teacher, **{k: options[k] for k in ("num_classes", "in_channels")},
                               **protocol_model_options(pair.teacher)).to(device)
        optimizer, scheduler = paper_schedule(teacher.parameters(), budget.teacher_epochs)
        teacher_method = SupervisedMethod(teacher, optimizer, scheduler, precision=precision, name="teacher")
        teacher_step = median_step_seconds(lambda x, y: teacher_method.train_step(x, y, 0), train_loader,
                                           args.steps, device)
        teacher_epoch = teacher_step * steps_per_epoch + eval_seconds(teacher, test_loader, device) * test_scale
        teacher.eval()
        method, side = students_method(teacher, pair.student, recipes, budget, info, train_loader, device, precision)
        members = len(method.members)
        step = median_step_seconds(lambda x, y: method.train_step(x, y, 0), train_loader, args.steps, device)
        evaluation = eval_seconds(method.members[0].student, test_loader, device) * test_scale * members
        epoch = step * steps_per_epoch + evaluation
        method.close()
        teacher_seconds[pair.teacher] = teacher_epoch * budget.teacher_epochs
        student_seconds += epoch * budget.epochs
        line = (f"| {pair.label} | {teacher_epoch:.1f} | {members} | {side} | {epoch:.1f} "
                f"({step * steps_per_epoch:.1f} + {evaluation:.1f}) | {epoch / members:.2f} |")
        lines.append(line)
        print(line, flush=True)
    total = sum(teacher_seconds.values()) + student_seconds
    summary = (f"\nProjected `{budget.name}` protocol ({len(teacher_seconds)} teachers × {budget.teacher_epochs} "
               f"epochs, students {budget.epochs} epochs): teachers {sum(teacher_seconds.values()) / 3600:.2f} h + "
               f"students {student_seconds / 3600:.2f} h = **{total / 3600:.2f} hours** on this device.")
    lines.append(summary)
    print(summary, flush=True)
    if args.out:
        write_markdown(args.out, lines, "at_table1_projection.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
