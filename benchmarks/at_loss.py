"""Attention transfer: forward+backward time of featkd's ``at_loss`` against the official one-liner.

The official AT code computes
``(F.normalize(s.pow(2).mean(1).view(B, -1)) - F.normalize(t.pow(2).mean(1).view(B, -1))).pow(2).mean()``.
featkd's ``at_loss`` adds input checks, layouts, resizing and float32 compute under autocast; this
measures what those cost. Both forms run side by side in one process, round-robin over repeats
(the machine may be shared), and the table gives the median time of each and their ratio
(> 1: featkd is faster), with the spread of that ratio: a 95% bootstrap interval over the rounds,
and in how many rounds featkd was the faster of the two (each round times both back to back).
The values are checked equal each run.

    python benchmarks/at_loss.py --threads 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featkd.repro.report import hardware  # noqa: E402
from featkd.functional import at_loss  # noqa: E402

SHAPES = [(128, 16, 32, 32), (128, 64, 16, 16), (32, 256, 8, 8), (32, 512, 7, 7), (64, 32, 16, 16)]


def official(s, t):
    b = s.shape[0]
    return (F.normalize(s.pow(2).mean(1).view(b, -1)) - F.normalize(t.pow(2).mean(1).view(b, -1))).pow(2).mean()


def featkd_form(s, t):
    return at_loss(s, t)


def step(fn, s, t):
    s.grad = None
    loss = fn(s, t)
    loss.backward()
    return loss.detach()


def measure(shape, repeats):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g).requires_grad_()
    t = torch.randn(shape[0], shape[1] * 2, *shape[2:], generator=g)
    forms = {"official": official, "featkd": featkd_form}
    values = {name: step(fn, s, t) for name, fn in forms.items()}  # warm-up, and the same value
    torch.testing.assert_close(values["featkd"], values["official"], rtol=1e-5, atol=0)
    times = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            started = time.perf_counter()
            step(fn, s, t)
            times[name].append(time.perf_counter() - started)
    return times


def ratio_interval(official, featkd, resamples=2000, seed=0):
    """95% bootstrap interval of median(official) / median(featkd), resampling whole rounds."""
    rng, n = random.Random(seed), len(official)
    ratios = []
    for _ in range(resamples):
        rounds = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(official[i] for i in rounds) / statistics.median(featkd[i] for i in rounds))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# at_loss vs the official one-liner (forward+backward), torch {torch.__version__}, "
          f"{hardware()}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| shape (B, C, H, W) | official ms | featkd ms | speed ratio (official / featkd) | 95% interval of the ratio "
          "| rounds featkd faster |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        times = measure(shape, args.repeats)
        official, featkd = statistics.median(times["official"]), statistics.median(times["featkd"])
        low, high = ratio_interval(times["official"], times["featkd"])
        faster = sum(o > f for o, f in zip(times["official"], times["featkd"]))
        print(f"| {shape} | {1e3 * official:.3f} | {1e3 * featkd:.3f} | {official / featkd:.2f}× | "
              f"{low:.2f}–{high:.2f}× | {faster}/{args.repeats} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
