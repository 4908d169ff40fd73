"""Token masks for the feature losses: which positions of a channels-first feature are real tokens.

A mask is a (B, N) tensor over the N positions of the (B, C, N) view a loss works on (``to_bcn``):
bool, or integers / floats holding only 0 and 1 (a Hugging Face ``attention_mask``), True (1) for a
valid token. N is the sequence length for (B, C, N) features or (B, N, C) tokens (``layout="tokens"``)
and H·W, row by row, for (B, C, H, W) maps; :func:`featkd.layouts.mask_to_channels_first` maps a mask
over a model's token sequence onto that view.

A masked loss equals the loss of each sample given alone without its padding, averaged over the
batch: padded positions are set to zero before anything else (a ``where``, so whatever they hold,
inf or NaN included, neither reaches the value nor receives a gradient), a normalisation over
positions runs over the valid ones, and a mean over tokens is taken per sample over its valid tokens,
then over the batch. A sample without a valid token is refused.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .shapes import _layout_dims, _numel, resize_pair


def check_mask(mask, shape: Sequence[int], what: str) -> Tensor:
    """``mask`` as a (B, N) bool tensor for a channels-first feature of ``shape`` (B, C, N); a ValueError
    of one line saying what is wrong otherwise (shape, values, a sample with no valid token)."""
    batch, positions = int(shape[0]), int(shape[-1])
    if not isinstance(mask, Tensor):
        raise ValueError(f"{what}: the token mask must be a (B, N) = ({batch}, {positions}) tensor, "
                         f"got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, positions):
        raise ValueError(f"{what}: token mask of shape {tuple(mask.shape)} for features of shape {tuple(shape)} "
                         f"(channels first): expected (B, N) = ({batch}, {positions}), True or 1 at each valid "
                         "position (featkd.layouts.mask_to_channels_first maps a mask over a model's tokens onto "
                         "this view)")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{what}: a token mask is bool or holds only 0 and 1, got dtype {mask.dtype} with "
                             f"other values (e.g. {mask[(mask != 0) & (mask != 1)].flatten()[0].item()!r})")
        mask = mask != 0
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what}: the token mask has no valid token in sample(s) {empty}; every sample needs at "
                         "least one (leave empty samples out of the batch)")
    return mask


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, C, N) with the padded positions of ``mask`` (B, N) set to zero; they get no gradient."""
    return torch.where(mask.unsqueeze(1), x, 0.0)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample mean of ``values`` (B, N) over the valid positions of ``mask`` (every position without one)."""
    if mask is None:
        return values.mean(1)
    return torch.where(mask, values, 0.0).sum(1) / mask.sum(1)


def masked_pair(f_s: Tensor, f_t: Tensor, mask, resize, layout: str, what: str):
    """:func:`resize_pair` and, with a mask, the mask checked and the padded positions of both zeroed:
    ``(x, y, mask)`` with x, y (B, C, N) and mask (B, N) bool or None."""
    if mask is not None:
        n_s = _numel(_layout_dims(f_s.shape, layout, "student")[2])
        n_t = _numel(_layout_dims(f_t.shape, layout, "teacher")[2])
        if n_s != n_t:
            raise ValueError(f"{what}: a token mask needs student and teacher at the same positions, got student "
                             f"{tuple(f_s.shape)} and teacher {tuple(f_t.shape)}; resizing would mix padded "
                             "positions into valid ones")
    x, y = resize_pair(f_s, f_t, resize, layout)
    if mask is None:
        return x, y, None
    mask = check_mask(mask, x.shape, what).to(x.device)
    return zero_padding(x, mask), zero_padding(y, mask), mask
