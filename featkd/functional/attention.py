"""Attention Transfer (Zagoruyko & Komodakis 2017).

The attention map of a feature is the channel mean of |f|^p at each position, flattened and
l2-normalised per sample.

* ``mode="official"`` (default, the authors' code): loss = mean over batch and positions of the
  squared difference of the two maps. The official training multiplies this by beta = 1e3 per
  layer group.
* ``mode="paper"``: loss = batch mean of ||Q_s - Q_t||_q, the q-norm (not squared) of the
  difference of the normalised maps. The paper has two exponents, both 2 in its experiments: ``p``
  in the map sum_c |A_c|^p and ``q`` in the norm of the difference (it writes p for both).

The betas: the official code's beta = 1e3 multiplies mean_{b,n} (Q_s - Q_t)^2 =
sum_b ||Q_s - Q_t||_2^2 / (B · N), so it is the paper's beta/2 = 1e3 / (B · N) per squared 2-norm
summed over the batch — the paper's "beta ≈ 1e3 / (positions × batch size)". The paper's own form
takes the norm unsquared, which no beta makes equal to the code's; the reproductions use the code's.

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

from ._masks import check_mask, masked_mean, masked_pair, zero_padding
from .shapes import check_choice, full_precision, to_bcn

AT_MODES = ("official", "paper")


def attention_map(f: Tensor, p: float = 2, layout: str = "channels_first", mask: Tensor | None = None) -> Tensor:
    """(B, N) l2-normalised channel mean of |f|^p; f as accepted by the feature losses. With a (B, N) token
    ``mask`` the map is zero at padded positions and normalised over the valid ones."""
    _check_exponent("p", p)
    x = to_bcn(f, layout)
    if mask is not None:
        x = zero_padding(x, check_mask(mask, x.shape, "attention_map").to(x.device))
    return _AttentionMap.apply(x, p)


_EPS = 1e-12  # F.normalize's floor on the norm


def _normalised_map(x: Tensor, p: float, *, inplace: bool = True) -> tuple[Tensor, Tensor]:
    """(map, the divisor that normalised it: its norm, floored) for x (B, C, N); ``inplace=False`` keeps
    it differentiable by autograd."""
    # square() for the usual p = 2, an integer power for even p: both skip abs() and the slow
    # float-exponent pow, which cost more than the rest of the loss together. The channel sum
    # replaces the mean: the normalisation cancels the 1/C (also below F.normalize's floor on the
    # norm, which is raised by the same factor C), and one pass over the map is saved.
    if p == 2:
        a = x.square().sum(1)
    elif float(p).is_integer() and int(p) % 2 == 0:
        a = x.pow(int(p)).sum(1)
    else:
        a = x.abs().pow(p).sum(1)
    norm = torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(_EPS * x.shape[1])
    return (a.div_(norm) if inplace else a / norm), norm


class _AttentionMap(torch.autograd.Function):
    """The attention map of x (B, C, N) with a hand-written backward.

    Why by hand: autograd's backward of ``x.square().sum(1)`` makes two (B, C, N) tensors ((2·grad)
    expanded to (B, C, N), then times x), each costing more than the arithmetic on a CPU; here the
    backward is one (B, C, N) product. Under create_graph=True autograd differentiates the map itself.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        q, norm = _normalised_map(x, p)
        ctx.save_for_backward(x, q, norm)
        ctx.p = p
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q, norm = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (second derivatives): the hand-written backward has no graph of its own
            q_graph, _ = _normalised_map(x, ctx.p, inplace=False)
            return torch.autograd.grad(q_graph, x, grad, create_graph=True)[0], None
        p = ctx.p
        # q = a / max(|a|, floor): da = (g - q (q·g)) / |a| above the floor, g / floor below it.
        radial = (q * grad).sum(1, keepdim=True) * (norm > _EPS * x.shape[1])
        grad_a = (grad - q * radial).div_(norm).unsqueeze(1)
        # a = Σ_c |x_c|^p: dx = p |x|^(p-1) sign(x) da
        if p == 2:
            return x * grad_a.mul_(2.0), None
        return x.abs().pow_(p - 1).mul_(x.sign()).mul_(grad_a.mul_(p)), None


def _check_exponent(name: str, value: float, norm: bool = False) -> None:
    """p > 0 for the map; q >= 1 for the norm (below 1 it is not a norm)."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not (value >= 1 if norm else value > 0):
        raise ValueError(f"AT exponent {name} must be {'>= 1' if norm else '> 0'}, got {value!r}")


@full_precision
def at_loss(
    f_s: Tensor,
    f_t: Tensor,
    p: float = 2,
    *,
    mode: str = "official",
    q: float = 2,
    resize: str | None = None,
    layout: str = "channels_first",
    mask: Tensor | None = None,
) -> Tensor:
    """Attention-transfer loss between student and teacher features (teacher detached).

    ``p`` is the exponent of the attention map, ``q`` the order of the norm of the map difference
    (``mode="paper"`` only). Channel counts may differ; spatial sizes must match unless ``resize``
    is "pool" or "interpolate" (applied to the features before the maps are formed). See the module
    docstring for the two modes and the beta convention.

    ``mask``: optional (B, N) token mask, True (or 1) for a valid position (:mod:`featkd.functional._masks`).
    The maps are then zero at padded positions and normalised over the valid ones; "official" takes
    the mean of the squared difference per sample over its valid positions, then over the batch;
    "paper" (a norm, no mean over positions) is unchanged by the zeros. Either way each sample counts
    as if it came without its padding.
    """
    _check_exponent("p", p)
    check_choice("AT mode", mode, AT_MODES)
    if mode == "paper":
        _check_exponent("q", q, norm=True)
    x, y, mask = masked_pair(f_s, f_t.detach(), mask, resize, layout, "at_loss")
    q_s = _AttentionMap.apply(x, p)
    with torch.no_grad():
        q_t, _ = _normalised_map(y, p)
    if mode == "official":
        if mask is not None:
            return masked_mean((q_s - q_t).square(), mask).mean()
        return F.mse_loss(q_s, q_t)  # the mean over batch and positions of the squared difference, one op
    return torch.linalg.vector_norm(q_s - q_t, ord=q, dim=1).mean()
