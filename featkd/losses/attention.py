"""Attention modules: Attention Transfer (:func:`featkd.functional.at_loss`) and MiniLM's attention-distribution
transfer (:func:`featkd.functional.attention_kl_loss`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featkd import functional as KF
from featkd.functional.shapes import check_choice
from featkd.functional.attention_kl import check_attention_shapes
from featkd.losses.registry import BatchContext, Shape, check_positions, context_mask, register_feature_loss


@register_feature_loss("at", uses_context=True)
class ATLoss(nn.Module):
    """Attention Transfer (see :func:`featkd.functional.at_loss`); leaves padded tokens out when the batch's
    context has a token mask (``BatchContext.attention_mask``). Features arrive channels first at equal
    positions: layouts and resizing are the :class:`featkd.Term`'s."""

    def __init__(self, p=2, *, mode="official", q=2):
        super().__init__()
        check_choice("AT mode", mode, KF.AT_MODES)
        KF.at_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), p, mode=mode, q=q)  # refuses bad exponents now
        self.p, self.mode, self.q = p, mode, q

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        check_positions("at", student_shape, teacher_shape)

    def forward(self, f_s: Tensor, f_t: Tensor, context: BatchContext | None = None) -> Tensor:
        return KF.at_loss(f_s, f_t, self.p, mode=self.mode, q=self.q, mask=context_mask(context))


@register_feature_loss("attention_kl", uses_context=True, as_captured=True)
class AttentionKLLoss(nn.Module):
    """MiniLM's KL(teacher ‖ student) between (B, heads, L, L) self-attention probabilities (see
    :func:`featkd.functional.attention_kl_loss`), padded queries and keys left out with a token mask in the
    batch's context (``BatchContext.attention_mask``, (B, L)).

    The features are the probabilities themselves, e.g. a Hugging Face model's ``attentions`` (captured from
    a self-attention module's output ``[1]`` when the model is called with ``output_attentions=True`` and built
    with ``attn_implementation="eager"``); they are read as captured: no layout, no adapter.
    """

    def __init__(self, *, heads="match"):
        super().__init__()
        check_choice("attention heads mode", heads, KF.HEAD_MODES)
        self.heads = heads

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        check_attention_shapes(student_shape, teacher_shape, self.heads)

    def forward(self, p_s: Tensor, p_t: Tensor, context: BatchContext | None = None) -> Tensor:
        return KF.attention_kl_loss(p_s, p_t, heads=self.heads, mask=context_mask(context))
