"""Attention transfer: forward+backward time of featkd's ``at_loss`` against the official one-liner.

The official AT code computes
``(F.normalize(s.pow(2).mean(1).view(B, -1)) - F.normalize(t.pow(2).mean(1).view(B, -1))).pow(2).mean()``.
featkd's ``at_loss`` adds input checks, layouts, resizing and float32 compute under autocast; this
measures what those cost. Both forms run side by side in one process, round-robin over repeats
(the machine may be shared), and the table gives the median time of each and their ratio
(> 1: featkd is faster), with the spread of that ratio: a 95% bootstrap interval over the rounds,
and in how many rounds featkd was the faster of the two (each round times both back to back).
The values are checked equal each run.

Runs on CUDA when available (``--device`` to choose). There each timed sample is the mean of 10
calls between two ``torch.cuda.synchronize()`` calls (one call lasts about as long as a
synchronisation), and the table adds each form's peak memory (``torch.cuda.max_memory_allocated``
above the inputs, one forward+backward).

    python benchmarks/at_loss.py --threads 1
    python benchmarks/at_loss.py --quick            # 10 rounds
    python benchmarks/at_loss.py --device cuda --out benchmarks/results/at_loss_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featkd.provenance import hardware  # noqa: E402
from featkd.functional import at_loss  # noqa: E402

SHAPES = [(128, 16, 32, 32), (128, 64, 16, 16), (32, 256, 8, 8), (32, 512, 7, 7), (64, 32, 16, 16)]
CALLS_PER_SAMPLE = {"cpu": 1, "cuda": 10}


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_peak_bytes(fn, s, t):
    """CUDA memory allocated at the peak of one forward+backward, above what was allocated before."""
    s.grad = None  # the gradient is part of what the step allocates
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, s, t)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(shape, repeats, device):
    """({form: seconds of forward+backward per round}, {form: CUDA peak bytes} or None on CPU)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g).to(device).requires_grad_()
    t = torch.randn(shape[0], shape[1] * 2, *shape[2:], generator=g).to(device)
    forms = {"official": official, "featkd": featkd_form}
    values = {name: step(fn, s, t) for name, fn in forms.items()}  # warm-up, and the same value
    torch.testing.assert_close(values["featkd"], values["official"], rtol=1e-5, atol=0)
    peaks = {name: cuda_peak_bytes(fn, s, t) for name, fn in forms.items()} if device.type == "cuda" else None
    calls = CALLS_PER_SAMPLE[device.type]
    times = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            _sync(device)
            started = time.perf_counter()
            for _ in range(calls):
                step(fn, s, t)
            _sync(device)
            times[name].append((time.perf_counter() - started) / calls)
    return times, peaks


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
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    repeats = 10 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    on_cuda = device.type == "cuda"
    where = "the GPU" if on_cuda else f"the CPU ({args.threads} torch thread(s))"
    lines = [f"at_loss vs the official one-liner (forward+backward), torch {torch.__version__}, {hardware()}, "
             f"timed on {where}, median of {repeats}", ""]
    peak_columns = " official peak MiB | featkd peak MiB |" if on_cuda else ""
    lines += ["| shape (B, C, H, W) | official ms | featkd ms | speed ratio (official / featkd) "
              f"| 95% interval of the ratio | rounds featkd faster |{peak_columns}",
              "|---|---|---|---|---|---|" + "---|" * (2 if on_cuda else 0)]
    print("\n".join(lines), flush=True)
    for shape in SHAPES:
        times, peaks = measure(shape, repeats, device)
        official, featkd = statistics.median(times["official"]), statistics.median(times["featkd"])
        low, high = ratio_interval(times["official"], times["featkd"])
        faster = sum(o > f for o, f in zip(times["official"], times["featkd"]))
        line = (f"| {shape} | {1e3 * official:.3f} | {1e3 * featkd:.3f} | {official / featkd:.2f}× | "
                f"{low:.2f}–{high:.2f}× | {faster}/{repeats} |")
        if peaks is not None:
            line += f" {peaks['official'] / 2**20:.1f} | {peaks['featkd'] / 2**20:.1f} |"
        lines.append(line)
        print(line, flush=True)
    if args.out:
        command = shlex.join(["python", "benchmarks/at_loss.py", *argv])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# at_loss vs the official AT one-liner, {hardware()}\n\nCommand: `{command}` "
                            f"({datetime.date.today()}, torch {torch.__version__}).\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
