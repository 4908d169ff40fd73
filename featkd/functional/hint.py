"""FitNets hints (Romero et al. 2015): regressed student features against teacher features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .shapes import full_precision


@full_precision
def hint_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Mean squared error over all elements between (regressed) student and teacher features.

    The shapes must be equal; :class:`featkd.losses.hint.HintLoss` owns the learnable regressor that
    maps the student's shape to the teacher's. The teacher is a fixed target (detached).
    """
    if f_s.shape != f_t.shape:
        raise ValueError(
            f"hint_loss needs equal shapes, got student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}; "
            "use featkd.losses.hint.HintLoss(student_shape, teacher_shape) for a learnable regressor"
        )
    if f_s.shape[0] == 0:
        raise ValueError(f"hint loss of an empty batch (B = 0): student {tuple(f_s.shape)}")
    return F.mse_loss(f_s, f_t.detach())
