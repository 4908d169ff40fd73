"""Where a fused step's time goes: the AT Table 1 pair's 25 students (5 columns × 5 seeds) as one FusedSweepMethod.

Profiles ``--steps`` training steps with ``torch.profiler`` after two warm-up steps and prints (1) the step's wall
time against the device time of its kernels (the difference is time the device waits on the host), (2) the
host time of each named phase of ``FusedSweepMethod.train_step`` and (3) the kernels that take the most device
time. CIFAR-10 shapes, synthetic images, as ``benchmarks/at_table1_projection.py``.

    python benchmarks/fused_step_profile.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _output import sync  # noqa: E402
from at_table1_projection import students_method  # noqa: E402
from featkd.data import load_dataset  # noqa: E402
from featkd.engine import Precision, seed_everything  # noqa: E402
from featkd.models import create_model  # noqa: E402
from featkd.provenance import hardware  # noqa: E402
from featkd.repro.protocols import AT_TABLE1, protocol_model_options, protocol_train_loader  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="kernels listed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    budget, pair = AT_TABLE1.budgets["full"], AT_TABLE1.pairs[0]
    train = load_dataset("synthetic", split="train", size=4096, num_classes=10, image_size=32, in_channels=3)
    loader = protocol_train_loader(train, budget, device)
    seed_everything(0)
    teacher = create_model(pair.teacher, num_classes=10, in_channels=3,
                           **protocol_model_options(pair.teacher)).to(device).eval()
    method, side = students_method(teacher, pair.student, AT_TABLE1.recipes, budget, train.info, loader, device,
                                   Precision(None, device))
    batches = iter(loader)
    for _ in range(2):
        method.train_step(*next(batches)[:2], 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(args.steps):
            method.train_step(*next(batches)[:2], 0)
        sync(device)
        wall = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    # the device side of a named range (record_function, the optimiser's step) repeats its kernels' time
    kernels = [e for e in events if e.device_type.name != "CPU" and e.self_device_time_total > 0
               and not getattr(e, "is_user_annotation", False) and not e.key.startswith(("fused/", "Optimizer."))]
    device_us = sum(e.self_device_time_total for e in kernels) / args.steps
    print(f"# A fused step of {len(method.members)} {pair.student} students ({side}), {hardware()}, "
          f"torch {torch.__version__}\n")
    print(f"step wall time {wall * 1e3:.1f} ms; device time of its kernels {device_us / 1e3:.1f} ms "
          f"({100 * device_us / 1e3 / (wall * 1e3):.0f}% of the wall time)\n")
    print("| phase | host ms a step |\n|---|---|")
    for event in sorted((e for e in events if e.key.startswith("fused/") and e.device_type.name == "CPU"),
                        key=lambda e: -e.cpu_time_total):
        print(f"| {event.key} | {event.cpu_time_total / 1e3 / args.steps:.1f} |")
    if device.type == "cuda":
        print(f"\n| kernel | calls a step | device ms a step |\n|---|---|---|")
        for event in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"| {event.key[:90]} | {event.count / args.steps:.0f} | "
                  f"{event.self_device_time_total / 1e3 / args.steps:.2f} |")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"\nkernel launches a step: {launches / args.steps:.0f}")
    method.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
