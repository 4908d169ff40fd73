"""Independent sweeps in parallel processes of one torch thread each.

On a small CPU, small convolutions scale poorly over threads: on 2 cores two 1-thread processes train
about half again as many student steps per second as one 2-thread process (the limited-data students,
measured side by side in ``benchmarks/parallel_sweeps.py``). A run's numbers depend on its thread count,
never on which process trained it, so work done in ``jobs`` processes equals the same work done one
piece at a time in one process at 1 thread, to the last digit.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence


def _one_thread() -> None:
    import torch

    from featkd.provenance import code_state

    torch.set_num_threads(1)
    code_state()  # the code this worker imports now, whatever the checkout holds when its runs start


def map_in_processes(fn: Callable, calls: Sequence[tuple[Any, ...]], jobs: int) -> list:
    """``[fn(*args) for args in calls]`` in ``jobs`` fresh processes (spawned: a forked OpenMP runtime can hang),
    each with one torch thread; results in the order of ``calls``, the first error raised here. ``fn`` must
    be importable by name and its arguments picklable."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(calls)) or 1, mp_context=context, initializer=_one_thread) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        return [future.result() for future in futures]
