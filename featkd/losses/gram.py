"""Gram-matrix and FSP modules (see :func:`featkd.functional.gram_loss`, :func:`featkd.functional.fsp_loss`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from featkd import functional as KF
from featkd.functional.shapes import channels, check_choice, check_spatial
from featkd.losses.registry import BatchContext, Shape, check_positions, context_mask, register_feature_loss


@register_feature_loss("gram", uses_context=True)
class GramLoss(nn.Module):
    """Spatial or channel Gram matching (see :func:`featkd.functional.gram_loss`); leaves padded tokens out
    when the batch's context has a token mask (``BatchContext.attention_mask``). Features arrive channels
    first: layouts and resizing are the :class:`featkd.Term`'s."""

    def __init__(self, *, mode="spatial", normalize=False, route="auto"):
        super().__init__()
        check_choice("Gram mode", mode, KF.GRAM_MODES)
        self.options = dict(mode=mode, normalize=normalize, route=route)

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        if self.options["mode"] == "spatial":
            check_positions("spatial gram", student_shape, teacher_shape)
        elif channels(student_shape, "channels_first", "student") != channels(teacher_shape, "channels_first",
                                                                             "teacher"):
            raise ValueError(
                f"channel Gram needs equal channel counts: student {tuple(student_shape)} vs teacher "
                f"{tuple(teacher_shape)}; use mode='spatial' or a hint regressor"
            )

    def forward(self, f_s: Tensor, f_t: Tensor, context: BatchContext | None = None) -> Tensor:
        return KF.gram_loss(f_s, f_t, mask=context_mask(context), **self.options)


@register_feature_loss("fsp", multi_layer=True)
class FSPLoss(nn.Module):
    """FSP matrices between two layers of each network (see :func:`featkd.functional.fsp_loss`).

    ``forward(f_s, f_t)`` takes a pair of features per network, channels first; the build shapes are pairs
    too. ``resize`` brings a network's two layers to one size (FSP's own matter: the two layers are of one
    network, which no teacher-student adapter touches).
    """

    def __init__(self, *, resize=None):
        super().__init__()
        self.resize, self.layout = resize, "channels_first"

    def check_shapes(self, student_shape: Sequence[Shape], teacher_shape: Sequence[Shape]) -> None:
        if len(student_shape) != 2 or len(teacher_shape) != 2 or not all(
            isinstance(s, (tuple, list, torch.Size)) for s in (*student_shape, *teacher_shape)
        ):
            raise ValueError(
                f"FSP needs a pair of layer shapes per network, got student {student_shape} and teacher {teacher_shape}"
            )
        for pair in (student_shape, teacher_shape):  # the two layers of one network
            check_spatial(pair[0], pair[1], self.resize, self.layout)
        c_s = [channels(s, self.layout, "student") for s in student_shape]
        c_t = [channels(s, self.layout, "teacher") for s in teacher_shape]
        if c_s != c_t:
            raise ValueError(
                f"FSP needs equal channel counts layer by layer: student layers {[tuple(s) for s in student_shape]} "
                f"(channels {c_s}) vs teacher layers {[tuple(s) for s in teacher_shape]} (channels {c_t})"
            )

    def forward(self, f_s: Sequence[Tensor], f_t: Sequence[Tensor]) -> Tensor:
        return KF.fsp_loss(f_s, f_t, resize=self.resize, layout=self.layout)
