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
On CUDA each timed sample runs the step 10 times between two ``torch.cuda.synchronize()`` calls
and takes the mean: one forward+backward at these sizes lasts tens of microseconds, about the
cost of the synchronisation itself.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the growth of
the process's resident-set high-water mark (Linux: write "5" to /proc/self/clear_refs to reset
VmHWM after ``malloc_trim(0)``, then read VmHWM from /proc/self/status), which counts every page
the allocator touched, so it is an upper bound on tensor memory at the few-MiB level.

GEMM ceiling fraction (rows with C >= 256, on both devices): the FLOP/s featkd's forward+backward
reaches in its matrix products, over the FLOP/s of plain ``torch.mm``/``torch.bmm`` of the same
operand sizes, dtype and device, timed in the same round-robin. The FLOPs are those of every matrix
product the route runs, recorded with a ``TorchDispatchMode`` during one forward+backward
(``mm``, ``bmm``, ``addmm``, ``baddbmm``, in place or not, autograd's and the hand-written
backward's included), 2·m·k·n per (m×k)·(k×n) product; elementwise work (normalisation, kernel,
exp, sums) is not counted, so its time lowers the fraction. Equal FLOPs on both sides make the
fraction the time of the plain products over featkd's time. At the benchmark's shapes (N = H·W):

* linear (the channel-mean route): 8·B·C·N — (1×C)·(C×N) for the student's and the teacher's
  mean, then (1×N)·(N×C) and (C×1)·(1×N) in the backward: matrix-vector products, so the ceiling
  there is memory bandwidth, not the GEMM peak;
* poly (the N×N route, chosen at C >= 256 for these N): 4·B·C·N² + 2·B·N² — (N×C)·(C×N) forward,
  (C×N)·(N×N) backward, and the sum of squares of the N×N block as a batched dot product;
* gaussian (the C×C blocks): 10·B·C²·N + 4·B·C² — three (C×N)·(N×C) Grams forward, two
  (C×C)·(C×N) backward, and two batched dot products over the C×C blocks.

    python benchmarks/nst_kernels.py                # full table, CPU (+ CUDA when present)
    python benchmarks/nst_kernels.py --quick        # B=32, two shapes, 2 repeats, no loops
    python benchmarks/nst_kernels.py --cuda-only --out benchmarks/results/nst_kernels_h200.md
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import gc
import io
import math
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featkd.provenance import hardware  # noqa: E402
from featkd.functional import nst as nst_module, nst_loss  # noqa: E402

SHAPES = [(16, 32, 32), (64, 16, 16), (256, 8, 8), (512, 7, 7)]
KERNELS = ["linear", "poly", "gaussian"]
SIGMA2 = 1.0
CEILING_MIN_CHANNELS = 256
CALLS_PER_SAMPLE = {"cpu": 1, "cuda": 10}


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


# ---- the GEMM ceiling ----------------------------------------------------------------------------

# aten matrix products -> positions of their two factors in the arguments
_MATRIX_PRODUCTS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "baddbmm": (1, 2),
                    "baddbmm_": (1, 2)}


class _MatrixProductRecorder(TorchDispatchMode):
    """Keeps the factor shapes of every matrix product run under it, autograd's backward included."""

    def __init__(self):
        super().__init__()
        self.factor_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        factors = _MATRIX_PRODUCTS.get(func.overloadpacket.__name__)
        if factors is not None:
            self.factor_shapes.append((args[factors[0]].shape, args[factors[1]].shape))
        return func(*args, **(kwargs or {}))


def gemm_ceiling(f_s, f_t, kernel):
    """(FLOPs of the matrix products in featkd's forward+backward, a function running plain mm/bmm of
    the same factor sizes on random data of the same dtype and device)."""
    recorder = _MatrixProductRecorder()
    with recorder:
        _step(featkd_form, f_s, f_t, kernel)
    # Every route's backward ends in a product shaped like the flattened input: without it the count
    # would be the forward's alone (a dispatch mode that missed autograd's device thread).
    input_shape = f_s.flatten(2).shape
    if not any((*a[:-1], b[-1]) == tuple(input_shape) for a, b in recorder.factor_shapes):
        raise AssertionError(f"no backward product recorded for {kernel}: {recorder.factor_shapes}")
    flops, products = 0, []
    for a_shape, b_shape in recorder.factor_shapes:
        flops += 2 * math.prod(a_shape) * b_shape[-1]
        a = torch.randn(a_shape, dtype=f_s.dtype, device=f_s.device)
        b = torch.randn(b_shape, dtype=f_s.dtype, device=f_s.device)
        out = torch.empty(*a_shape[:-1], b_shape[-1], dtype=f_s.dtype, device=f_s.device)
        products.append((torch.mm if a.dim() == 2 else torch.bmm, a, b, out))

    def run_products():
        for product, a, b, out in products:
            product(a, b, out=out)

    return flops, run_products


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


def measure(forms, f_s, f_t, kernel, repeats, ceiling=None):
    """({form: (median seconds, peak bytes above the inputs, loss value)} of forward+backward, median
    seconds of the zero-argument ``ceiling`` or None).

    The repeats go round-robin over the forms and the ceiling, so load from other processes on a
    shared machine hits every one alike and the ratios stay comparable.
    """
    device = f_s.device
    steps = {name: functools.partial(_step, form, f_s, f_t, kernel) for name, form in forms.items()}
    if ceiling is not None:
        ceiling()  # warm-up
        steps["ceiling"] = ceiling
    values, peaks, times = {}, {}, {name: [] for name in steps}
    for name, form in forms.items():
        values[name] = _step(form, f_s, f_t, kernel).item()  # warm-up
        f_s.grad = None  # the gradient is part of what the step allocates
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
        for name, step in steps.items():
            if name == "loops" and rep > 0:
                continue  # one timed run is plenty at seconds per call
            calls = 1 if name == "loops" else CALLS_PER_SAMPLE[device.type]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / calls)
    results = {name: (statistics.median(times[name]), peaks[name], values[name]) for name in forms}
    return results, (statistics.median(times["ceiling"]) if ceiling is not None else None)


def fmt_ms(sec):
    return "—" if sec is None else f"{sec * 1e3:.1f}"


def fmt_mib(nbytes):
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def run(device, batches, shapes, repeats, max_broadcast_gib, max_loop_pairs):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n### {device.type.upper()}  ({where})\n")
    print("| B | C | H×W | kernel | featkd ms | three-mean ms | featkd time / three-mean | bmm ms | broadcast ms "
          "| loops ms | × vs broadcast | × vs bmm | featkd peak MiB | bmm peak MiB | broadcast peak MiB "
          "| featkd GFLOP/s | GEMM ceiling fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
                flops, ceiling = gemm_ceiling(f_s, f_t, kernel) if c >= CEILING_MIN_CHANNELS else (None, None)
                res, ceiling_time = measure(forms, f_s, f_t, kernel, repeats, ceiling)
                ref = res["featkd"][2]
                for name, (_, _, value) in res.items():
                    if abs(value - ref) > 1e-3 * abs(ref) + 1e-6:
                        raise AssertionError(f"{name} gives {value}, featkd {ref} at B={b} C={c} N={n} {kernel}")
                t = {k: v[0] for k, v in res.items()}
                m = {k: v[1] for k, v in res.items()}
                ratio_b = f"{t['broadcast'] / t['featkd']:.1f}" if "broadcast" in t else "—"
                ratio_m = f"{t['bmm'] / t['featkd']:.1f}"
                if flops is None:
                    rate = fraction = "—"
                else:
                    rate = f"{flops / t['featkd'] / 1e9:.1f}"
                    fraction = f"{ceiling_time / t['featkd']:.2f}"  # the same FLOPs on both sides
                print(f"| {b} | {c} | {h}×{w} | {kernel} | {fmt_ms(t['featkd'])} | {fmt_ms(t['three-mean'])} | "
                      f"{t['featkd'] / t['three-mean']:.2f} | {fmt_ms(t['bmm'])} | "
                      f"{fmt_ms(t.get('broadcast'))} | {fmt_ms(t.get('loops'))} | {ratio_b} | {ratio_m} | "
                      f"{fmt_mib(m['featkd'])} | {fmt_mib(m['bmm'])} | {fmt_mib(m.get('broadcast'))} | {rate} | "
                      f"{fraction} |", flush=True)
    print(f"\nloops: explicit Python loops over samples and channel pairs, run once, only where B·C² ≤ {max_loop_pairs} "
          "(elsewhere too slow: —).")
    print(f"featkd GFLOP/s, GEMM ceiling fraction (C ≥ {CEILING_MIN_CHANNELS}): the FLOPs of the matrix products "
          "featkd's forward+backward runs, per second of it, and over the same FLOPs per second of plain torch.mm/bmm "
          "of the same sizes (the module docstring says how they are counted).")
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


class _Tee(io.StringIO):
    """A stdout that keeps a copy of what it prints (the --out file repeats the printed tables)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)

    def flush(self):
        self.stream.flush()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=32 and two shapes, 2 repeats, no loops form")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-broadcast-gib", type=float, default=1.0,
                        help="skip the broadcast form where one (B, C, C, N) temporary exceeds this")
    parser.add_argument("--max-loop-pairs", type=int, default=10_000, help="run loops only where B·C² <= this")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--cpu-only", action="store_true")
    devices.add_argument("--cuda-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    if args.cuda_only and not torch.cuda.is_available():
        parser.error("--cuda-only: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, shapes, repeats = ([32], SHAPES[:3:2], 2) if args.quick else ([32, 128], SHAPES, args.repeats)
    max_loop_pairs = 0 if args.quick else args.max_loop_pairs
    with contextlib.redirect_stdout(_Tee(sys.stdout)) as printed:
        print(f"torch {torch.__version__}, {hardware()}, gaussian sigma2={SIGMA2}")
        if not args.cuda_only:
            run(torch.device("cpu"), batches, shapes, repeats, args.max_broadcast_gib, max_loop_pairs)
        if torch.cuda.is_available() and not args.cpu_only:
            run(torch.device("cuda"), batches, shapes, repeats, max(args.max_broadcast_gib, 8.0), max_loop_pairs)
    if args.out:
        command = shlex.join(["python", "benchmarks/nst_kernels.py", *argv])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# NST kernels, {hardware()}\n\nCommand: `{command}` ({datetime.date.today()}, "
                            f"torch {torch.__version__}).\n\n{printed.getvalue()}")


if __name__ == "__main__":
    main()
