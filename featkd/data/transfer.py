"""Transfer-set edits: pure functions that return a new ``ImageDataset`` and leave their input untouched.

* ``omit_classes`` — Hinton et al. 2015's omitted-class experiment: the transfer set has no example of
  some classes (the student keeps their outputs; ``info`` is unchanged).
* ``mark_unlabeled`` / ``add_unlabeled`` — Noisy-Student-style transfer sets: examples with label -1 are
  learned only from the teacher's soft targets.
"""

from __future__ import annotations

from typing import Iterable

import torch

from featkd.data.datasets import ImageDataset
from featkd.functional.logits import UNLABELED


def omit_classes(ds: ImageDataset, classes: Iterable[int]) -> ImageDataset:
    """Drop every example whose label is in ``classes``."""
    classes = torch.as_tensor(list(classes), dtype=torch.int64)
    bad = classes[(classes < 0) | (classes >= ds.info.num_classes)]
    if len(bad):
        raise ValueError(f"cannot omit classes {bad.tolist()}: {ds.info.name} has classes 0..{ds.info.num_classes - 1}")
    return ds.subset(torch.nonzero(~torch.isin(ds.labels, classes)).flatten())


def mark_unlabeled(ds: ImageDataset, fraction: float, seed: int = 0) -> ImageDataset:
    """Set the label of ``round(fraction · N)`` examples, chosen by ``seed``, to -1 (unlabeled)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = round(fraction * len(ds))
    chosen = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:count]
    labels = ds.labels.clone()
    labels[chosen] = UNLABELED
    return ImageDataset(ds.images, labels, ds.info)


def add_unlabeled(ds: ImageDataset, extra: ImageDataset) -> ImageDataset:
    """``ds`` followed by every image of ``extra`` with label -1; keeps ``ds.info`` (its normalisation)."""
    if extra.images.shape[1:] != ds.images.shape[1:]:
        raise ValueError(f"extra images have shape {tuple(extra.images.shape[1:])} (C, H, W) but {ds.info.name} "
                         f"has {tuple(ds.images.shape[1:])}; load the extra data with matching "
                         "in_channels/image_size")
    labels = torch.cat([ds.labels, torch.full_like(extra.labels, UNLABELED)])
    return ImageDataset(torch.cat([ds.images, extra.images]), labels, ds.info)
