"""DistributedDataParallel helpers for runs launched with ``torchrun``.

``torchrun --nproc_per_node=N -m featkd.cli distill ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init` reads
them. Without them everything here is a no-op for a single process, so the
same code path runs with and without DDP. Each rank reads its own shard of the
data (``DeviceLoader(rank=, world_size=)``), epoch metrics are all-reduced and
only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_launched() -> bool:
    """True when the environment of a ``torchrun`` worker is present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment (idempotent).

    The backend is NCCL for CUDA devices and gloo otherwise. Outside ``torchrun``
    this returns ``DistInfo()`` (rank 0 of 1) without creating a group.
    """
    if not is_launched():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        use_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def info() -> DistInfo:
    """The current process's place in an initialised group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def is_main_process() -> bool:
    return info().is_main


def world_size() -> int:
    return info().world_size


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (call once at the end of a ``torchrun`` worker).

    Every rank waits for the others before tearing its group down: a gloo rank whose peer has already
    destroyed its group can abort ("terminate called without an active exception", exit -6), which
    made the DDP test fail now and then on a loaded 2-core machine. A rank that failed never arrives;
    after the timeout the others tear down anyway.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:
            pass
        dist.destroy_process_group()


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over all ranks (identity for one process); keys must match on every rank."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    # NCCL only reduces CUDA tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(keys, tensor.tolist()))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank (``[obj]`` for one process)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap(module: nn.Module, device: str | torch.device | None = None, **ddp_options: Any) -> nn.Module:
    """Wrap ``module`` in DistributedDataParallel when running distributed; return it unchanged otherwise.

    Modules without trainable parameters (a frozen teacher) are returned unwrapped:
    DDP has nothing to synchronise for them.
    """
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    device = torch.device(device) if device is not None else next(module.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **ddp_options)


