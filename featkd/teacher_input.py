"""The teacher's view of a batch: its batch-norm mode (:func:`teacher_bn_mode`) and the conversion of a batch
normalised for the student into the normalisation the teacher expects (:class:`InputConversion`)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from featkd.layer_specs import unwrap
from featkd.models import input_normalization

__all__ = ["InputConversion", "Normalization", "TEACHER_BN_MODES", "normalization", "teacher_bn_mode"]


# --------------------------------------------------------------------------- the teacher's batch norm

TEACHER_BN_MODES = ("eval", "batch_stats")


@contextlib.contextmanager
def teacher_bn_mode(teacher: nn.Module, mode: str) -> Iterator[None]:
    """Run the frozen ``teacher``'s forwards inside this block with its BN layers in ``mode``.

    ``"eval"``: as they are (the teacher is in eval mode: its running statistics). ``"batch_stats"``:
    every BN layer normalises each batch with that batch's own statistics, as the official NST code ran
    its teacher, and its running statistics (and batch count) are left untouched.
    """
    if mode not in TEACHER_BN_MODES:
        raise ValueError(f"teacher_bn must be one of {list(TEACHER_BN_MODES)}, got {mode!r}")
    batch_norms = nn.modules.batchnorm._BatchNorm
    norms = [m for m in teacher.modules() if isinstance(m, batch_norms)] if mode == "batch_stats" else []
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            # training mode with track_running_stats off: batch statistics, no running-statistics update
            m.train(True)
            m.track_running_stats = False
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = tracking


# --------------------------------------------------------------------------- the teacher's input normalisation

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def normalization(value, model: nn.Module, role: str) -> Normalization | None:
    """``(mean, std)`` per channel from ``value``: None, ``(mean, std)``, or ``"pretrained_cfg"`` (the model's)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "pretrained_cfg":
            raise ValueError(f"{role}_normalization must be (mean, std) or 'pretrained_cfg', got {value!r}")
        found = input_normalization(model)
        if found is None:
            raise ValueError(f"{role}_normalization='pretrained_cfg': the {role} ({type(unwrap(model)).__name__}) "
                             f"records no mean/std; give {role}_normalization=(mean, std)")
        return found
    try:
        mean, std = (tuple(float(v) for v in (part if isinstance(part, (list, tuple)) else [part])) for part in value)
    except (TypeError, ValueError):
        raise ValueError(f"{role}_normalization must be (mean, std), one value per channel, got {value!r}") from None
    # a NaN, zero or infinite std (or a non-finite mean) would feed the teacher NaN or a blank batch
    if len(mean) != len(std) or not mean or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"{role}_normalization: mean {mean} and std {std} need one value per channel, finite "
                         "means and finite stds > 0")
    return mean, std


def _per_channel(values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


class InputConversion(nn.Module):
    """A batch normalised with ``student`` ``(mean, std)`` as the ``teacher`` normalisation would give it:
    ``(x * std_s + mean_s - mean_t) / std_t`` per channel; the batch as it is when either is None or they agree.
    ``normalizations`` is ``(student, teacher)`` when there is something to convert, else None."""

    def __init__(self, student: Normalization | None = None, teacher: Normalization | None = None):
        super().__init__()
        self.normalizations = (student, teacher) if None not in (student, teacher) and student != teacher else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalizations is None:
            return x
        (mean_s, std_s), (mean_t, std_t) = self.normalizations
        if x.dim() < 2 or {len(mean_s), len(mean_t)} - {1, x.shape[1]}:
            raise ValueError(f"the normalisations (student mean {mean_s}, teacher mean {mean_t}) do not fit a batch "
                             f"of shape {tuple(x.shape)}: give one value per input channel")
        return (x * _per_channel(std_s, x) + _per_channel(mean_s, x) - _per_channel(mean_t, x)) / _per_channel(std_t, x)

    def extra_repr(self) -> str:
        return f"normalizations={self.normalizations}"
