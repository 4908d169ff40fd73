"""Similarity-preserving KD (Tung and Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation").

Inputs that activate the teacher alike should activate the student alike. Per layer, the (B, B) Gram
matrix of the batch's flattened activations, each row l2-normalised, is compared between student
and teacher. Only the batch size has to agree, so layers of any width and spatial size pair up
without an adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .shapes import full_precision


def similarity_matrix(f: Tensor) -> Tensor:
    """G̃ = row-normalised Q Qᵀ, with Q the (B, C·H·W) flattened features (any layout: only B is kept)."""
    q = f.reshape(f.shape[0], -1)
    return F.normalize(q @ q.T, dim=1)


@full_precision
def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """‖G̃_s − G̃_t‖_F² / B² (:func:`similarity_matrix`); the teacher is a fixed target (detached)."""
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"sp_loss compares samples of one batch: student {tuple(f_s.shape)} and teacher "
                         f"{tuple(f_t.shape)} differ in batch size")
    with torch.no_grad():
        g_t = similarity_matrix(f_t)
    return (similarity_matrix(f_s) - g_t).square().sum() / f_s.shape[0] ** 2
