"""Attention Transfer's module (see :func:`featkd.functional.at_loss`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featkd import functional as KF
from featkd.functional.shapes import check_choice, check_spatial
from featkd.losses.registry import Shape, register_feature_loss


@register_feature_loss("at")
class ATLoss(nn.Module):
    """Attention Transfer (see :func:`featkd.functional.at_loss`)."""

    def __init__(self, p=2, *, mode="official", q=2, resize=None, layout="channels_first"):
        super().__init__()
        check_choice("AT mode", mode, KF.AT_MODES)
        KF.at_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), p, mode=mode, q=q)  # refuses bad exponents now
        self.p, self.mode, self.q, self.resize, self.layout = p, mode, q, resize, layout

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        check_spatial(student_shape, teacher_shape, self.resize, self.layout)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return KF.at_loss(f_s, f_t, self.p, mode=self.mode, q=self.q, resize=self.resize, layout=self.layout)
