"""``DeviceLoader``: the whole dataset on the device, batches gathered by index and augmented there.

For CIFAR/Fashion-MNIST-sized data the per-image Python transforms of a ``DataLoader`` pipeline are
replaced by a few tensor ops per batch, with no worker processes. All randomness of an epoch (the
permutation, crop offsets, flips) is drawn up front from a CPU ``torch.Generator`` seeded by
(seed, epoch) only, so a resumed run sees exactly the same batches, CPU and CUDA runs see the same
data, and every rank of a DDP run draws the same plan and takes its own shard of it.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from featkd.data.datasets import ImageDataset


def evaluation_batch_size(device) -> int:
    """The batch size for evaluating a small model: 128 on the CPU, where larger batches of activations
    leave the cache (WRN-16-1 on 28×28 evaluated 1.8× faster at 64-128 than at 500, 2 threads, AMD
    EPYC), 500 on an accelerator."""
    return 128 if torch.device(device).type == "cpu" else 500


# DeviceLoader's pad_mode -> torch.nn.functional.pad's mode.
PAD_MODES = {"zeros": "constant", "reflect": "reflect"}


class EpochPlan(NamedTuple):
    """This rank's data for one epoch, in order: dataset indices, crop offsets (dy, dx) in 0..2·pad, flips."""

    indices: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int,
              pad_mode: str = "zeros") -> torch.Tensor:
    """Batched random crop of the padded images and horizontal flip, as one gather.

    ``images`` (B, C, H, W); output pixel (y, x) of image b is pixel (y + dy_b, x' + dx_b) of the image
    padded by ``pad`` on every side, where x' = W - 1 - x if ``flips[b]`` else x. ``pad_mode``:
    ``"zeros"`` pads with zeros; ``"reflect"`` mirrors the image about its edge pixels (as
    ``np.pad(mode="reflect")``; the official AT code's CIFAR augmentation), which needs pad < H, W.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {sorted(PAD_MODES)}, got {pad_mode!r}")
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode=PAD_MODES[pad_mode])
    padded = padded.permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C): gather rows/cols
    ys = offsets[:, :1] + torch.arange(h, device=images.device)        # (B, H)
    xs = torch.arange(w, device=images.device).expand(b, w)
    xs = torch.where(flips[:, None], w - 1 - xs, xs) + offsets[:, 1:]   # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)


class DeviceLoader:
    """Iterate ``(x, y)`` batches of ``ds`` on ``device``: x float32 normalised with the dataset mean/std,
    y int64 (-1 = unlabeled).

    ``augment``: random crop of the image padded by ``pad`` pixels (``pad_mode`` ``"zeros"`` or ``"reflect"``,
    see :func:`crop_flip`) and horizontal flip (``flip=False`` to disable).
    ``set_epoch(e)`` selects the epoch; as with ``DistributedSampler``, an epoch not set repeats epoch 0.
    DDP: ranks share one permutation; like ``DistributedSampler``'s default, it is padded by repeating
    its first examples to a multiple of ``world_size`` and rank r takes positions r, r + world_size, ...,
    so shards are disjoint (up to those < world_size repeats) and cover the dataset.
    ``drop_last`` drops this rank's last incomplete batch (``False`` keeps it: every example once per
    epoch, as a plain ``DataLoader``); ``len(loader)`` is the batches per epoch.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, *, shuffle: bool = True, augment: bool = False,
                 device: str | torch.device = "cpu", seed: int = 0, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1, pad: int = 4, flip: bool = True, pad_mode: str = "zeros"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(ds) == 0:
            raise ValueError("cannot load from an empty dataset")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {sorted(PAD_MODES)}, got {pad_mode!r}")
        if augment and pad_mode == "reflect" and pad >= min(ds.images.shape[-2:]):
            raise ValueError(f"pad_mode='reflect' mirrors inside the image, so pad must be smaller than its "
                             f"{tuple(ds.images.shape[-2:])} size; got pad={pad}")
        self.dataset, self.info = ds, ds.info
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.device, self.seed, self.drop_last = torch.device(device), seed, drop_last
        self.rank, self.world_size, self.pad, self.flip, self.pad_mode = rank, world_size, pad, flip, pad_mode
        self.epoch = 0
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(ds.info.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(ds.info.std, device=self.device).view(shape) * 255
        self.shard_size = math.ceil(len(ds) / world_size)
        if drop_last and self.shard_size < batch_size:
            raise ValueError(f"drop_last=True with batch_size={batch_size} but this rank has only "
                             f"{self.shard_size} examples: no batch would be produced")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def epoch_plan(self, epoch: int | None = None) -> EpochPlan:
        """The indices, crop offsets and flips this rank uses in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        # SeedSequence mixes (seed, epoch) into well-separated streams: nearby seeds/epochs do not correlate.
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, np.uint64)
        gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        # Augmentation draws belong to positions of the global order, so they do not depend on world_size.
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        total = self.shard_size * self.world_size
        shard = slice(self.rank, total, self.world_size)
        # pad (examples and their draws) by repeating the head, then interleave: rank r takes r, r + W, ...
        return EpochPlan(*(torch.cat([t, t[: total - n]])[shard] for t in (order, offsets, flips)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.epoch_plan()
        plan = EpochPlan(*(t.to(self.device, non_blocking=True) for t in plan))
        for i in range(len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            index = plan.indices[batch]
            x = self.images[index]
            if self.augment:
                x = crop_flip(x, plan.offsets[batch], plan.flips[batch], self.pad, self.pad_mode)
            yield (x.float() - self.mean) / self.std, self.labels[index]
