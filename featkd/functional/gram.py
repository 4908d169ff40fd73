"""Gram-matrix matching (spatial and channel Gram) and FSP (Yim et al. 2017).

All compare batched Gram products, averaged over the batch; the teacher is a fixed target
(detached).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._masks import masked_pair
from .shapes import check_choice, full_precision, resize_pair, to_bcn
from .nst import ROUTES, spatial_gram_distance

GRAM_MODES = ("spatial", "channel")


@full_precision
def gram_loss(
    f_s: Tensor,
    f_t: Tensor,
    *,
    mode: str = "spatial",
    normalize: bool = False,
    resize: str | None = None,
    layout: str = "channels_first",
    route: str = "auto",
    mask: Tensor | None = None,
) -> Tensor:
    """Squared Frobenius distance between student and teacher Gram matrices, batch mean.

    * ``mode="spatial"``: Gram = F^T F / C (N×N), so channel counts may differ and spatial sizes
      must match (or ``resize``). With ``normalize=True`` (each channel's map l2-normalised first)
      this is exactly NST with the poly kernel, degree 2, c=0. ``route`` as in NST.
    * ``mode="channel"``: Gram = F F^T / N (C×C, the style-transfer Gram), so spatial sizes may
      differ but channel counts must be equal (put a hint regressor in front otherwise).

    ``mask``: optional (B, N) token mask, True (or 1) for a valid position (:mod:`featkd.functional._masks`),
    for student and teacher at the same N positions. Padded positions are zeroed first (and
    ``normalize`` then runs over the valid ones). Spatial: the N×N Gram has zero rows and columns at
    padded tokens, so the distance sums over the n_b × n_b valid pairs of sample b (no division by
    n_b², as without a mask there is none by N²). Channel: Gram = F F^T / n_b, divided by the sample's
    count of valid tokens instead of N. Either way each sample counts as if it came without its padding.
    """
    check_choice("Gram mode", mode, GRAM_MODES)
    check_choice("Gram route", route, ROUTES)
    if mode == "channel":
        x, y = to_bcn(f_s, layout, "student"), to_bcn(f_t.detach(), layout, "teacher")
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"channel Gram needs equal channel counts: student {tuple(f_s.shape)} has {x.shape[1]}, "
                f"teacher {tuple(f_t.shape)} has {y.shape[1]}; use mode='spatial' or a hint regressor"
            )
        if mask is not None:
            x, y, mask = masked_pair(x, y, mask, None, "channels_first", "gram_loss")
        if normalize:
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        if mask is None:
            with torch.no_grad():
                target = torch.bmm(y, y.transpose(1, 2)).div_(y.shape[2])
            diff = torch.baddbmm(target, x, x.transpose(1, 2), beta=-1.0, alpha=1.0 / x.shape[2])
        else:
            tokens = mask.sum(1).to(x.dtype).view(-1, 1, 1)
            with torch.no_grad():
                target = torch.bmm(y, y.transpose(1, 2)).div_(tokens)
            diff = torch.bmm(x, x.transpose(1, 2)).div_(tokens).sub_(target)
        return diff.square().sum((1, 2)).mean()
    x, y, _ = masked_pair(f_s, f_t.detach(), mask, resize, layout, "gram_loss")
    return spatial_gram_distance(x, y, route, normalize=normalize).mean()


def fsp_matrix(f_a: Tensor, f_b: Tensor, *, resize: str | None = None, layout: str = "channels_first") -> Tensor:
    """(B, C_a, C_b) FSP matrix F_a F_b^T / N of two layers of one network.

    The two layers must share the spatial size, or pass ``resize="pool"`` (the larger map is
    average-pooled to the smaller) or ``"interpolate"`` (the first is resized to the second).
    """
    x, y = resize_pair(f_a, f_b, resize, layout)
    return torch.bmm(x, y.transpose(1, 2)) / x.shape[2]


@full_precision
def fsp_loss(
    f_s: Sequence[Tensor],
    f_t: Sequence[Tensor],
    *,
    resize: str | None = None,
    layout: str = "channels_first",
) -> Tensor:
    """FSP loss: mean squared difference between the student's and teacher's FSP matrices.

    ``f_s`` and ``f_t`` are pairs (first layer, second layer) of one network each. The student's
    and teacher's channel counts must agree layer by layer (the FSP matrices are compared entry
    by entry); their spatial sizes may differ.
    """
    if len(f_s) != 2 or len(f_t) != 2:
        raise ValueError(f"fsp_loss takes a pair of layers per network, got {len(f_s)} student and {len(f_t)} teacher features")
    g_s = fsp_matrix(f_s[0], f_s[1], resize=resize, layout=layout)
    with torch.no_grad():
        g_t = fsp_matrix(f_t[0], f_t[1], resize=resize, layout=layout)
    if g_s.shape[1:] != g_t.shape[1:]:
        raise ValueError(
            f"FSP needs equal channel counts layer by layer: student layers {[tuple(f.shape) for f in f_s]} "
            f"give a {tuple(g_s.shape[1:])} matrix, teacher layers {[tuple(f.shape) for f in f_t]} give {tuple(g_t.shape[1:])}"
        )
    return (g_s - g_t).square().mean()
