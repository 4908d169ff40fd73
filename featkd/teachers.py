"""Loading a teacher: the one way every command and protocol takes a trained model from a checkpoint.

:func:`load_teacher` refuses a file whose sha256 is not the expected one (the shipped teacher) and a teacher
trained for other classes or input channels than the run's data, and hands the model back frozen in eval mode.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from featkd import checkpoint as ckpt


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_teacher_fits(record: dict, info, source) -> None:
    """Refuse a teacher trained for other classes or other input channels than the run's data (``info``)."""
    if (record["num_classes"], record["in_channels"]) != (info.num_classes, info.in_channels):
        raise ValueError(f"teacher {source} was trained for {record['num_classes']} classes of "
                         f"{record['in_channels']}-channel images, but {info.name} has {info.num_classes} classes of "
                         f"{info.in_channels}-channel images")


def load_teacher(path: str | Path, device: torch.device | str, info=None,
                 sha256: str | None = None) -> tuple[nn.Module, dict]:
    """The model of a ``featkd train`` checkpoint, in eval mode, and its record.

    ``info`` (the run's :class:`featkd.data.DatasetInfo`): refuse a teacher trained for other classes or input
    channels. ``sha256``: refuse a file whose hash differs (checked before the file is unpickled)."""
    if sha256:
        got = file_sha256(path)
        if got != sha256:
            raise ValueError(f"teacher checkpoint {path} has sha256 {got}, expected {sha256}: the file is not the "
                             "shipped teacher (retrain it with --retrain-teacher, or restore the file)")
    teacher, record = ckpt.model_from_checkpoint(ckpt.load_checkpoint(path), torch.device(device), source=str(path))
    if info is not None:
        check_teacher_fits(record, info, path)
    return teacher.eval(), record
