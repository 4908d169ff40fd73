"""Cost of feature capture: a plain forward against the same forward with 4 layers captured.

Three identical resnet18 copies (plain, FeatureExtractor clone=True, clone=False) are timed in
interleaved rounds, so that machine noise hits all of them alike; the medians and their ratios
to the plain model are printed, on CPU and on CUDA when present. In the forward+backward rows
the captured variants also back-propagate a mean of each feature (what a distillation loss
would do), so they include that small extra work.

    python benchmarks/hook_overhead.py [--batch 32] [--size 64] [--rounds 15] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

from featkd.hooks import FeatureExtractor

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(device: torch.device, batch: int, size: int, rounds: int) -> None:
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).to(device)
    variants = {"plain": lambda m: m}
    for clone in (True, False):
        variants[f"capture 4 layers, clone={clone}"] = (
            lambda m, clone=clone: FeatureExtractor(m, LAYERS, clone=clone)
        )
    models = {name: make(copy.deepcopy(plain)) for name, make in variants.items()}
    x = torch.randn(batch, 3, size, size, device=device)

    def inference(run):
        with torch.no_grad():
            run(x)

    def train_step(run):
        out = run(x)
        logits, feats = out if isinstance(out, tuple) else (out, {})
        loss = logits.sum() + sum(f.mean() for f in feats.values())
        loss.backward()

    for mode, step in (("forward (no_grad)", inference), ("forward+backward", train_step)):
        times = {name: [] for name in models}
        for name, run in models.items():  # warm-up
            step(run)
        for _ in range(rounds):
            for name, run in models.items():
                times[name].append(timed(lambda: step(run), device))
        base = statistics.median(times["plain"])
        print(f"\n{device.type}, resnet18, batch {batch}x3x{size}x{size}, {mode}, median of {rounds}:")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<30} {med * 1e3:8.2f} ms   x{med / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        bench(device, args.batch, args.size, args.rounds)


if __name__ == "__main__":
    main()
