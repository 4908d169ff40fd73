"""Two 1-thread processes against one 2-thread process: student training steps per second on a 2-core CPU.

``featkd repro limited-data``, ``featkd tune`` and ``featkd demo`` take ``--jobs N``: the seeds' sweeps run in
N processes of one torch thread each instead of one process with torch's threads. This measures why: a
WRN-16-1 student's SGD step (batch 64, 32×32 Fashion-MNIST-sized inputs, forward and backward) in the two
arrangements, side by side in one run, alternating over rounds (the machine may be shared), each round
timing both for the same wall time. The table gives the median steps per second of each and their ratio
(> 1: the processes are faster), with a 95% bootstrap interval over the rounds.

    python benchmarks/parallel_sweeps.py --rounds 5 --seconds 15
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def steps_per_second(threads: int, seconds: float, queue) -> None:
    import torch

    from featkd.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("wrn16_1", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator and kernels
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    queue.put(steps / (time.perf_counter() - start))


def arrangement(processes: int, threads: int, seconds: float) -> float:
    """Total steps per second of ``processes`` concurrent processes of ``threads`` torch threads each."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=steps_per_second, args=(threads, seconds, queue)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(queue.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per arrangement per round")
    args = parser.parse_args()
    from featkd.provenance import cpu_model
    import os

    import torch

    one, two = [], []
    for _ in range(args.rounds):
        order = [(1, 2, one), (2, 1, two)]
        random.shuffle(order)
        for processes, threads, out in order:
            out.append(arrangement(processes, threads, args.seconds))
    ratios = [b / a for a, b in zip(one, two)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; {args.rounds} rounds of "
          f"{args.seconds:g} s per arrangement\n")
    print("| arrangement | student steps/s (median) |")
    print("|---|---|")
    print(f"| 1 process × 2 threads | {statistics.median(one):.2f} |")
    print(f"| 2 processes × 1 thread | {statistics.median(two):.2f} |")
    print(f"\nratio (2 processes / 1 process): {statistics.median(ratios):.2f} "
          f"(95% bootstrap interval {boot[50]:.2f}–{boot[1949]:.2f}; the processes faster in "
          f"{sum(r > 1 for r in ratios)} of {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
