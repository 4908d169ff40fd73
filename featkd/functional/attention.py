"""Attention Transfer (Zagoruyko & Komodakis 2017).

The attention map of a feature is the channel mean of |f|^p at each position, flattened and
l2-normalised per sample.

* ``mode="official"`` (default, the authors' code): loss = mean over batch and positions of the
  squared difference of the two maps. The official training multiplies this by beta = 1e3 per
  layer group.
* ``mode="paper"``: loss = batch mean of ||Q_s - Q_t||_p (the p-norm, not squared, of the
  difference of the normalised maps). The paper writes beta/2 times the sum over layers, with
  beta ≈ 1e3 / (positions × batch size) relative to the official mean.

Relation to NST: AT is linear-kernel NST on a single "channel", the attention map itself:
``at_loss(f_s, f_t, p) * N == nst_loss(|f_s|^p.mean(1, keepdim=True), |f_t|^p..., "linear")``.
For non-negative (post-ReLU) features and p=1 the map is the plain channel mean, i.e. AT is
linear NST with the l2 normalisation applied to the channel mean instead of to each channel
(tested in tests/test_functional_identities.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._shapes import check_choice, full_precision, resize_pair, to_bcn

AT_MODES = ("official", "paper")


def attention_map(f: Tensor, p: float = 2, layout: str = "channels_first") -> Tensor:
    """(B, N) l2-normalised channel mean of |f|^p; f as accepted by the feature losses."""
    return _attention(to_bcn(f, layout), p)


def _attention(x: Tensor, p: float) -> Tensor:
    return F.normalize(x.abs().pow(p).mean(1), dim=1)


@full_precision
def at_loss(
    f_s: Tensor,
    f_t: Tensor,
    p: float = 2,
    *,
    mode: str = "official",
    resize: str | None = None,
    layout: str = "channels_first",
) -> Tensor:
    """Attention-transfer loss between student and teacher features (teacher detached).

    Channel counts may differ; spatial sizes must match unless ``resize`` is "pool" or
    "interpolate" (applied to the features before the maps are formed). See the module docstring
    for the two modes and the beta convention.
    """
    check_choice("AT mode", mode, AT_MODES)
    x, y = resize_pair(f_s, f_t.detach(), resize, layout)
    q_s, q_t = _attention(x, p), _attention(y, p)
    if mode == "official":
        return (q_s - q_t).square().mean()
    return torch.linalg.vector_norm(q_s - q_t, ord=p, dim=1).mean()
