"""The similarity-preserving loss's module (Tung and Mori 2019; its math: :mod:`featkd.functional.similarity`)."""

from __future__ import annotations

from torch import Tensor, nn

from featkd.functional import sp_loss
from featkd.losses.registry import Shape, register_feature_loss


@register_feature_loss("sp")
class SPLoss(nn.Module):
    """Similarity-preserving loss of one (student, teacher) layer pair (see :func:`featkd.functional.sp_loss`).

    Only the batch size has to agree, so layers of any width and spatial size pair up without an adapter."""

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        if len(student_shape) < 2 or len(teacher_shape) < 2 or student_shape[0] != teacher_shape[0]:
            raise ValueError(f"sp needs batched features of one batch size, got student {tuple(student_shape)} "
                             f"and teacher {tuple(teacher_shape)}")

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return sp_loss(f_s, f_t)
