"""Hidden-state regression: FitNets hints (Romero et al. 2015) and DistilBERT's cosine loss (Sanh et al. 2019)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._masks import check_mask, masked_mean, zero_padding
from .shapes import full_precision, to_bcn


def _check_equal_shapes(f_s: Tensor, f_t: Tensor, what: str) -> None:
    if f_s.shape != f_t.shape:
        raise ValueError(
            f"{what} needs equal shapes, got student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}; "
            "use featkd.losses.hint.HintLoss(student_shape, teacher_shape) for a learnable regressor"
        )
    if f_s.shape[0] == 0:
        raise ValueError(f"{what} of an empty batch (B = 0): student {tuple(f_s.shape)}")


def _equal_pair(f_s: Tensor, f_t: Tensor, mask, layout: str, what: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """(B, C, N) views of two features of one shape, with the mask checked and padded positions zeroed."""
    _check_equal_shapes(f_s, f_t, what)
    x, y = to_bcn(f_s, layout, "student"), to_bcn(f_t.detach(), layout, "teacher")
    if mask is None:
        return x, y, None
    mask = check_mask(mask, x.shape, what).to(x.device)
    return zero_padding(x, mask), zero_padding(y, mask), mask


@full_precision
def hint_loss(f_s: Tensor, f_t: Tensor, *, mask: Tensor | None = None, layout: str = "channels_first") -> Tensor:
    """Mean squared error over all elements between (regressed) student and teacher features.

    The shapes must be equal; :class:`featkd.losses.hint.HintLoss` owns the learnable regressor that
    maps the student's shape to the teacher's. The teacher is a fixed target (detached).

    ``mask``: optional (B, N) token mask over the positions of the (B, C, N) view (``layout`` as in the
    other feature losses; :mod:`featkd.functional._masks`). Then the squared error is averaged per
    sample over its valid tokens and the C channels, then over the batch.
    """
    if mask is None:
        _check_equal_shapes(f_s, f_t, "hint_loss")
        return F.mse_loss(f_s, f_t.detach())
    x, y, mask = _equal_pair(f_s, f_t, mask, layout, "hint_loss")
    return (masked_mean((x - y).square().sum(1), mask) / x.shape[1]).mean()


@full_precision
def cosine_loss(f_s: Tensor, f_t: Tensor, *, mask: Tensor | None = None, layout: str = "channels_first",
                eps: float = 1e-8) -> Tensor:
    """DistilBERT's cosine embedding loss: 1 - cos(student, teacher) between the C-vectors at each position.

    The mean over positions per sample (over its valid tokens with a (B, N) ``mask``), then over the
    batch. DistilBERT's script averages over all selected tokens of the batch at once, so a sample
    weighs by its length there; here each sample weighs the same, as in the other masked losses.
    Shapes must be equal (a hint regressor in front otherwise); ``eps`` floors each vector's norm
    (:func:`torch.nn.functional.cosine_similarity`). The teacher is a fixed target (detached).
    """
    x, y, mask = _equal_pair(f_s, f_t, mask, layout, "cosine_loss")
    return masked_mean(1.0 - F.cosine_similarity(x, y, dim=1, eps=eps), mask).mean()
