"""NST kernels: forward+backward time and peak memory of featkd's nst_loss against the naive forms.

Compared side by side, in one run, for each kernel (linear, poly d=2 c=0, gaussian with an explicit
bandwidth so that every form does the same arithmetic):

* featkd     -- ``featkd.functional.nst_loss``: with equal channel counts (as here) the paired,
                cancellation-free route from D = X - Y (mean of D for linear; cheaper of the N×N /
                C×C products for poly; the kernel's second difference on three Gram blocks otherwise),
                with a hand-written backward
* three-mean -- featkd's previous computation, kept as the route for unequal channel counts:
                mean k(X,X) + mean k(Y,Y) - 2 mean k(X,Y) (channel means for linear, the N×N
                route for poly when cheaper) — the time the paired route must stay within 1.3× of
* bmm        -- the plain batched-Gram version: k(bmm(x, yᵀ)).mean() for the three blocks
* broadcast  -- the public-code form ``(a.unsqueeze(1) * b.unsqueeze(2)).sum(-1)`` (a (B, C, C, N)
                temporary per block), as in RepDistiller / mdistiller
* loops      -- explicit Python loops over samples and channel pairs (only where B·C² is small)

All forms normalise each channel, compute the teacher–teacher block under no_grad and give the
same value (checked each run). Time: median over repeats of forward+backward after one warm-up,
the repeats taken round-robin over the forms (the machine may be shared).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the growth of
the process's resident-set high-water mark (Linux: write "5" to /proc/self/clear_refs to reset
VmHWM after ``malloc_trim(0)``, then read VmHWM from /proc/self/status), which counts every page
the allocator touched, so it is an upper bound on tensor memory at the few-MiB level.

    python benchmarks/nst_kernels.py                # full table, CPU (+ CUDA when present)
    python benchmarks/nst_kernels.py --quick        # B=32, two shapes, 2 repeats
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featkd.repro.report import hardware  # noqa: E402
from featkd.functional import nst as nst_module, nst_loss  # noqa: E402

SHAPES = [(16, 32, 32), (64, 16, 16), (256, 8, 8), (512, 7, 7)]
KERNELS = ["linear", "poly", "gaussian"]
SIGMA2 = 1.0


def kernel_of(name):
    if name == "linear":
        return lambda dot: dot
    if name == "poly":
        return lambda dot: dot.square()
    return lambda dot: None  # gaussian works on squared distances; see the forms below


# ---- the reference forms -------------------------------------------------------------------------

def _normalized(f_s, f_t):
    return F.normalize(f_s.flatten(2), dim=-1), F.normalize(f_t.detach().flatten(2), dim=-1)


def bmm_form(f_s, f_t, kernel):
    x, y = _normalized(f_s, f_t)

    def block(a, b):
        dot = torch.bmm(a, b.transpose(1, 2))
        if kernel == "gaussian":
            sq = (a.square().sum(-1).unsqueeze(2) + b.square().sum(-1).unsqueeze(1) - 2 * dot).clamp_min(0)
            return torch.exp(-sq / (2 * SIGMA2)).mean((1, 2))
        return kernel_of(kernel)(dot).mean((1, 2))

    with torch.no_grad():
        tt = block(y, y)
    return (block(x, x) + tt - 2 * block(x, y)).mean()


def broadcast_form(f_s, f_t, kernel):
    x, y = _normalized(f_s, f_t)

    def block(a, b):
        if kernel == "gaussian":
            sq = (a.unsqueeze(1) - b.unsqueeze(2)).square().sum(-1)
            return torch.exp(-sq / (2 * SIGMA2)).mean((1, 2))
        return kernel_of(kernel)((a.unsqueeze(1) * b.unsqueeze(2)).sum(-1)).mean((1, 2))

    with torch.no_grad():
        tt = block(y, y)
    return (block(x, x) + tt - 2 * block(x, y)).mean()


def loop_form(f_s, f_t, kernel):
    x, y = _normalized(f_s, f_t)

    def k(a, b):
        if kernel == "linear":
            return torch.dot(a, b)
        if kernel == "poly":
            return torch.dot(a, b) ** 2
        return torch.exp(-(a - b).square().sum() / (2 * SIGMA2))

    def block(a, b):
        return sum(k(a[i], b[j]) for i in range(a.shape[0]) for j in range(b.shape[0])) / (a.shape[0] * b.shape[0])

    total = 0.0
    for s in range(x.shape[0]):
        with torch.no_grad():
            tt = block(y[s], y[s])
        total = total + block(x[s], x[s]) + tt - 2 * block(x[s], y[s])
    return total / x.shape[0]


def _options(kernel):
    return {"sigma2": SIGMA2} if kernel == "gaussian" else {}


def featkd_form(f_s, f_t, kernel):
    return nst_loss(f_s, f_t, kernel, **_options(kernel))


def three_mean_form(f_s, f_t, kernel):
    x, y = f_s.flatten(2), f_t.detach().flatten(2)
    if kernel == "poly":
        return nst_module.spatial_gram_distance(x, y, "auto").mean()
    spec = nst_module.KERNELS[kernel]
    return nst_module._three_mean_mmd(spec, spec.resolve(_options(kernel)), x, y).mean()


FORMS = {"featkd": featkd_form, "three-mean": three_mean_form, "bmm": bmm_form, "broadcast": broadcast_form,
         "loops": loop_form}


# ---- measurement ---------------------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _cpu_peak_reset() -> int:
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(form, f_s, f_t, kernel):
    f_s.grad = None
    loss = form(f_s, f_t, kernel)
    loss.backward()
    return loss.detach()


def measure(forms, f_s, f_t, kernel, repeats):
    """{form: (median seconds, peak bytes above the inputs, loss value)} of forward+backward.

    The repeats go round-robin over the forms, so load from other processes on a shared machine
    hits every form alike and the ratios stay comparable.
    """
    device = f_s.device
    values, peaks, times = {}, {}, {name: [] for name in forms}
    for name, form in forms.items():
        values[name] = _step(form, f_s, f_t, kernel).item()  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(form, f_s, f_t, kernel)
            _sync(device)
            peaks[name] = torch.cuda.max_memory_allocated() - base
        else:
            base = _cpu_peak_reset()
            _step(form, f_s, f_t, kernel)
            peaks[name] = (_status_kib("VmHWM") - base) * 1024
    for rep in range(repeats):
        for name, form in forms.items():
            if name == "loops" and rep > 0:
                continue  # one timed run is plenty at seconds per call
            _sync(device)
            t0 = time.perf_counter()
            _step(form, f_s, f_t, kernel)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), peaks[name], values[name]) for name in forms}


def fmt_ms(sec):
    return "—" if sec is None else f"{sec * 1e3:.1f}"


def fmt_mib(nbytes):
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def run(device, batches, shapes, repeats, max_broadcast_gib, max_loop_pairs):
    print(f"\n### {device.type.upper()}  ({torch.get_num_threads()} threads)\n")
    print("| B | C | H×W | kernel | featkd ms | three-mean ms | featkd time / three-mean | bmm ms | broadcast ms "
          "| loops ms | × vs broadcast | × vs bmm | featkd peak MiB | bmm peak MiB | broadcast peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for b in batches:
        for c, h, w in shapes:
            n = h * w
            gen = torch.Generator().manual_seed(0)
            f_s = torch.randn(b, c, h, w, generator=gen).to(device).requires_grad_()
            f_t = torch.randn(b, c, h, w, generator=gen).to(device)
            for kernel in KERNELS:
                forms = {}
                for name, form in FORMS.items():
                    if name == "broadcast" and b * c * c * n * 4 / 2**30 > max_broadcast_gib:
                        notes.append(f"broadcast skipped at B={b}, C={c}, H×W={h}×{w}: one (B, C, C, N) float32 "
                                     f"temporary is {b * c * c * n * 4 / 2**30:.1f} GiB (> --max-broadcast-gib)")
                        continue
                    if name == "loops" and b * c * c > max_loop_pairs:
                        continue
                    forms[name] = form
                res = measure(forms, f_s, f_t, kernel, repeats)
                ref = res["featkd"][2]
                for name, (_, _, value) in res.items():
                    if abs(value - ref) > 1e-3 * abs(ref) + 1e-6:
                        raise AssertionError(f"{name} gives {value}, featkd {ref} at B={b} C={c} N={n} {kernel}")
                t = {k: v[0] for k, v in res.items()}
                m = {k: v[1] for k, v in res.items()}
                ratio_b = f"{t['broadcast'] / t['featkd']:.1f}" if "broadcast" in t else "—"
                ratio_m = f"{t['bmm'] / t['featkd']:.1f}"
                print(f"| {b} | {c} | {h}×{w} | {kernel} | {fmt_ms(t['featkd'])} | {fmt_ms(t['three-mean'])} | "
                      f"{t['featkd'] / t['three-mean']:.2f} | {fmt_ms(t['bmm'])} | "
                      f"{fmt_ms(t.get('broadcast'))} | {fmt_ms(t.get('loops'))} | {ratio_b} | {ratio_m} | "
                      f"{fmt_mib(m['featkd'])} | {fmt_mib(m['bmm'])} | {fmt_mib(m.get('broadcast'))} |", flush=True)
    print(f"\nloops: explicit Python loops over samples and channel pairs, run once, only where B·C² ≤ {max_loop_pairs} "
          "(elsewhere too slow: —).")
    for note in dict.fromkeys(notes):
        print(f"- {note}")
    accuracy(device, shapes)


def accuracy(device, shapes, b=8):
    """Relative error against float64 on the same float32 tensors, student = teacher + eps (post-ReLU maps)."""
    print("\nValue accuracy, student = teacher + eps (ReLU maps), |float32 - float64| / float64, worst over eps "
          "in 1e-1 … 1e-4:\n")
    print("| C | H×W | kernel | featkd | three-mean |")
    print("|---|---|---|---|---|")
    for c, h, w in shapes:
        gen = torch.Generator().manual_seed(1)
        f_t = torch.randn(b, c, h, w, generator=gen).relu().to(device)
        for kernel in KERNELS:
            worst = {"featkd": 0.0, "three-mean": 0.0}
            for eps in (1e-1, 1e-2, 1e-3, 1e-4):
                f_s = (f_t + eps * torch.randn(b, c, h, w, generator=gen).to(device)).relu()
                exact = featkd_form(f_s.double(), f_t.double(), kernel).item()
                for name in worst:
                    got = FORMS[name](f_s, f_t, kernel).item()
                    worst[name] = max(worst[name], abs(got - exact) / exact)
            print(f"| {c} | {h}×{w} | {kernel} | {worst['featkd']:.1e} | {worst['three-mean']:.1e} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=32 and two shapes, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-broadcast-gib", type=float, default=1.0,
                        help="skip the broadcast form where one (B, C, C, N) temporary exceeds this")
    parser.add_argument("--max-loop-pairs", type=int, default=10_000, help="run loops only where B·C² <= this")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, shapes, repeats = ([32], SHAPES[:3:2], 2) if args.quick else ([32, 128], SHAPES, args.repeats)
    print(f"torch {torch.__version__}, {hardware()}, gaussian sigma2={SIGMA2}")
    run(torch.device("cpu"), batches, shapes, repeats, args.max_broadcast_gib, args.max_loop_pairs)
    if torch.cuda.is_available() and not args.cpu_only:
        run(torch.device("cuda"), batches, shapes, repeats, max(args.max_broadcast_gib, 8.0), args.max_loop_pairs)


if __name__ == "__main__":
    main()
