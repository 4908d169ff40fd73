"""A run's data from its config: the datasets (image or text), the training and test loaders for this rank,
and the loader ``featkd eval`` scores saved models on."""

from __future__ import annotations

import torch

from featkd import distributed
from featkd.config import Config, ConfigError, DataConfig

__all__ = ["build_datasets", "build_loaders", "evaluation_loader"]


def build_datasets(data: DataConfig):
    """The training split (with its transfer-set edits) and the test split."""
    from featkd.data import add_unlabeled, load_dataset, mark_unlabeled, omit_classes
    from featkd.data.text import is_text_dataset, load_text_dataset

    if is_text_dataset(data.name):
        edits = [key for key, value in (("omit_classes", data.omit_classes), ("unlabeled_fraction",
                 data.unlabeled_fraction), ("extra_unlabeled", data.extra_unlabeled)) if value]
        if edits:
            raise ConfigError(f"data.{edits[0]} edits an image transfer set; the text dataset {data.name!r} takes "
                              "none: remove it")
        return (load_text_dataset(data.name, "train", limit=data.limit, **data.options),
                load_text_dataset(data.name, "test", limit=data.test_limit, **data.options))

    # Subsets are chosen with a fixed seed so that runs with different training seeds see the same data.
    train = load_dataset(data.name, data.root, "train", limit=data.limit, **data.options)
    test = load_dataset(data.name, data.root, "test", limit=data.test_limit, **data.options)
    if data.omit_classes:
        train = omit_classes(train, data.omit_classes)
    if data.unlabeled_fraction:
        train = mark_unlabeled(train, data.unlabeled_fraction)
    if data.extra_unlabeled is not None:
        extra = data.extra_unlabeled
        train = add_unlabeled(train, load_dataset(extra.name, extra.root, "train", limit=extra.limit, **extra.options))
    return train, test


def build_loaders(cfg: Config, device: torch.device):
    """Training and test :class:`featkd.data.DeviceLoader` for this rank; ``data.batch_size`` is the global batch."""
    from featkd.data import DeviceLoader

    rank = distributed.info()
    if cfg.data.batch_size % rank.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over "
                          f"{rank.world_size} processes")
    train, test = build_datasets(cfg.data)
    if not hasattr(train, "images"):
        return _text_loaders(cfg, train, test, rank.world_size)
    shard = dict(rank=rank.rank, world_size=rank.world_size, device=device)
    train_loader = DeviceLoader(train, cfg.data.batch_size // rank.world_size, shuffle=True, augment=cfg.data.augment,
                                seed=cfg.seed, drop_last=cfg.data.drop_last, pad=cfg.data.pad, flip=cfg.data.flip,
                                pad_mode=cfg.data.pad_mode, **shard)
    test_loader = DeviceLoader(test, cfg.data.eval_batch_size, shuffle=False, augment=False, drop_last=False, **shard)
    return train_loader, test_loader


def _text_loaders(cfg: Config, train, test, world_size: int):
    """:class:`featkd.data.text.PaddedBatches` for a text dataset: batches padded to their longest sequence."""
    from featkd.data.text import PaddedBatches

    if world_size > 1:
        raise ConfigError(f"text datasets ({cfg.data.name}) train in one process; run without torchrun")
    return (PaddedBatches(train.sequences, train.labels, batch_size=cfg.data.batch_size, seed=cfg.seed,
                          info=train.info),
            PaddedBatches(test.sequences, test.labels, batch_size=cfg.data.eval_batch_size, shuffle=False,
                          info=test.info))


def evaluation_loader(cfg: Config, split: str, device: torch.device):
    """``(loader, how to read its batches, the dataset)`` of ``split`` for evaluating saved models (``featkd
    eval``): a text dataset's padded batches, or an image dataset's :class:`featkd.data.DeviceLoader`."""
    from featkd.batches import IMAGES
    from featkd.data import DeviceLoader, load_dataset
    from featkd.data.text import PaddedBatches, is_text_dataset, load_text_dataset

    limit = cfg.data.test_limit if split == "test" else cfg.data.limit
    if is_text_dataset(cfg.data.name):
        data = load_text_dataset(cfg.data.name, split, limit=limit, **cfg.data.options)
        loader = PaddedBatches(data.sequences, data.labels, batch_size=cfg.data.eval_batch_size, shuffle=False,
                               info=data.info)
        return loader, loader.batch_format, data
    data = load_dataset(cfg.data.name, cfg.data.root, split, limit=limit, **cfg.data.options)
    return (DeviceLoader(data, cfg.data.eval_batch_size, shuffle=False, augment=False, drop_last=False,
                         device=device), IMAGES, data)
