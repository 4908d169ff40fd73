"""NST's paired route, with a hand-written backward, and the arithmetic the NST routes share.

With equal channel counts the MMD is computed from the difference of the unit channels,
D = X - Y (see :mod:`featkd.functional.nst`). Here that is one ``torch.autograd.Function``,
:func:`paired_mmd`, around three ways ("forms") of computing the per-sample MMD from D and Y:

* :func:`block_mmd`: the kernel's second difference on the C×C blocks ``a = YYᵀ``, ``u = DYᵀ``,
  ``w = DDᵀ`` (x_i·y_j = a + u_ij, y_i·x_j = a + u_ji, x_i·x_j = a + u_ij + u_ji + w_ij);
* :func:`outer_channel_mmd`: the same for poly degree 2, c = 0, in closed form;
* :func:`outer_spatial_mmd`: poly degree 2, c = 0 through N×N products,
  ``XᵀX - YᵀY = ((X+Y)ᵀD + Dᵀ(X+Y)) / 2``.

Why by hand. Under autograd the elementwise second difference kept every (B, C, C) temporary and
ran a backward pass per operation: 1.3-2.6× the time of the three kernel means it replaced
(issue #10). The gradient needs far less. With f the kernel as a function of its Gram entry (or
squared distance), the derivative of the per-sample MMD with respect to the unit rows X is

    G = κ/C² (gap · Y + slope · D),   slope = f'(xx),  gap = f'(xx) - f'(xy)   (C×C, rows i, columns j)

with κ = 2 for kernels of Gram entries and κ = -4 for kernels of squared distances; for the latter
G also has a component along each row X_i, left out because the backward of the row normalisation
removes it anyway. ``gap`` is a difference of nearby values, so each kernel states it without
cancellation, like its second difference. The backward is then two (B, C, N) products, and the
forward makes no (B, C, C) temporaries beyond the three blocks and what the kernel makes of them in
place: on a CPU, a fresh tensor of a few MiB costs page faults worth more than its arithmetic.
Second derivatives (``create_graph=True``) go through the three-mean form under autograd instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

_DEAD = 1e-24  # squared norm under which a channel is all-zero (F.normalize's eps, squared)


def inverse_norms(sq_norms: Tensor) -> Tensor:
    """1/|f_c| from squared norms; 0 for dead channels, so they act as zero vectors (no 0·inf in grads)."""
    live = sq_norms > _DEAD
    return torch.where(live, torch.where(live, sq_norms, 1.0).rsqrt(), 0.0)


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample sum of a ⊙ b over (B, ...) batches, as a batched dot product (no product temporary)."""
    return torch.bmm(a.reshape(a.shape[0], 1, -1), b.reshape(b.shape[0], -1, 1)).view(-1)


def median_bandwidth(sq_dist: Tensor) -> Tensor:
    """Median heuristic: sigma2 = median of the student–teacher squared distances over the batch.

    One bandwidth per call, computed without grad from the cross block (the scale at which the two
    samples are compared; unlike the self blocks it has no zero diagonal). ``torch.median`` takes
    the lower of the two middle values for an even count. Falls back to 1 when the median is 0
    (student equal to teacher), where any bandwidth gives MMD 0.
    """
    with torch.no_grad():
        med = sq_dist.detach().flatten().median()
        return torch.where(med > 0, med, torch.ones_like(med))


@dataclass(frozen=True)
class UnitPair:
    """A student x (B, C, N) and a fixed teacher y (B, C, N) as unit rows: D = X - Y and Y."""

    d: Tensor
    unit_y: Tensor
    inv_x: Tensor  # 1/|x_i|, 0 for dead channels (B, C)
    live_x: Tensor  # (B, C) bool
    live_y: Tensor

    @classmethod
    def of(cls, x: Tensor, y: Tensor) -> "UnitPair":
        inv_x = inverse_norms(torch.linalg.vector_norm(x, dim=-1).square())
        inv_y = inverse_norms(torch.linalg.vector_norm(y, dim=-1).square())
        unit_y = y * inv_y.unsqueeze(-1)
        # D's own rounding is first order: about 1e-7/eps relative when x is within eps of y (3.5e-4
        # measured at eps = 1e-4), against the 1e-7/eps² of the three-mean form. Written without any
        # cancellation ((x - y)/|x| + y (1/|x| - 1/|y|)) it took 1.3-2.6× the time of the whole loss.
        d = torch.addcmul(unit_y, x, inv_x.unsqueeze(-1), value=-1.0).neg_()
        return cls(d, unit_y, inv_x, inv_x > 0, inv_y > 0)

    def row_scale(self, grad: Tensor) -> Tensor:
        """(B, C, 1): the output gradient per sample over |x_i| (0 for dead channels)."""
        return (self.inv_x * grad.unsqueeze(1)).unsqueeze(-1)

    def input_grad(self, g: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        """dL/dx from g = dL/dX (up to components along the rows of X; overwritten), L = Σ_b grad_b MMD_b."""
        # Through X = x/|x|: (G - X (X·G)) / |x|, with X·G = (x·G)/|x|.
        scale = self.row_scale(grad)
        radial = torch.linalg.vecdot(x, g).unsqueeze(-1) * scale * self.inv_x.square().unsqueeze(-1)
        return g.mul_(scale).addcmul_(x, radial, value=-1.0)


# (pair, with_grad) -> (per-sample MMD, None or input_grad(x, grad) -> dL/dx)
PairedForm = Callable[[UnitPair, bool], tuple[Tensor, Callable[[Tensor, Tensor], Tensor] | None]]


class _PairedMMD(torch.autograd.Function):
    """Per-sample MMD of the unit rows of x (B, C, N) against those of the fixed y, by ``form``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, form: PairedForm, differentiable: Callable[[Tensor], Tensor]) -> Tensor:
        value, ctx.input_grad = form(UnitPair.of(x, y), ctx.needs_input_grad[0])
        ctx.differentiable = differentiable
        ctx.save_for_backward(x)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (second derivatives: gradient penalties, meta-learning): the hand-written
            # backward has no graph of its own, so the gradient comes from autograd's own form, whose
            # derivatives exist to every order; the same value, at its cost and fp32 rounding.
            return torch.autograd.grad(ctx.differentiable(x), x, grad, create_graph=True)[0], None, None, None
        return ctx.input_grad(x, grad), None, None, None


def paired_mmd(x: Tensor, y: Tensor, form: PairedForm, differentiable: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-sample MMD of the unit rows of x (B, C, N) and y (B, C, N); y is a fixed target (no gradient).
    ``differentiable(x)`` is the same per-sample MMD through autograd's ops, used for second derivatives."""
    return _PairedMMD.apply(x, y.detach(), form, differentiable)


def block_mmd(spec: Any, params: Mapping[str, Any]) -> PairedForm:
    """The MMD as the mean over channel pairs of ``spec.second_difference`` on the C×C blocks."""

    def form(pair: UnitPair, with_grad: bool):
        d, unit_y = pair.d, pair.unit_y
        c = d.shape[1]
        a = torch.bmm(unit_y, unit_y.mT)
        u = torch.bmm(d, unit_y.mT)
        w = torch.bmm(d, d.mT)
        kernel_params = dict(params)
        if spec.structure == "dot":
            base, du, dw, kappa = a, u, w, 2.0
        else:
            # |p|² + |q|² - 2 p·q with |.|² ∈ {0, 1} (dead or live); the student's norms change by e.
            n_y = pair.live_y.to(a.dtype)
            e = pair.live_x.to(a.dtype) - n_y
            base = a.mul_(-2.0).add_(n_y.unsqueeze(2)).add_(n_y.unsqueeze(1)).clamp_min_(0.0)
            du = u.mul_(-2.0).add_(e.unsqueeze(2))
            dw = w.mul_(-2.0)
            kappa = -4.0
            if "sigma2" in params and params["sigma2"] is None:
                kernel_params["sigma2"] = median_bandwidth((base + du).clamp_min_(0.0))
        total, slope, gap = spec.second_difference(base, du, dw, with_grad, **kernel_params)
        if not with_grad:
            return total / (c * c), None
        k = kappa / (c * c)

        def input_grad(x, grad):
            return pair.input_grad(torch.bmm(gap, unit_y).baddbmm_(slope, d, beta=k, alpha=k), x, grad)

        return total / (c * c), input_grad

    return form


def outer_spatial_mmd(pair: UnitPair, with_grad: bool):
    """Poly degree 2, c = 0 through N×N products: ``||XᵀX - YᵀY||²_F / C²``, a sum of squares."""
    d, unit_y = pair.d, pair.unit_y
    c = d.shape[1]
    q = torch.bmm(torch.add(d, unit_y, alpha=2.0).mT, d)  # (X + Y)ᵀ (X - Y)
    m = q + q.mT  # 2 (XᵀX - YᵀY)
    value = batched_dot(m, m) / (4 * c * c)
    if not with_grad:
        return value, None

    def input_grad(x, grad):
        # d/dX ||XᵀX - YᵀY||² / C² = 4 X (XᵀX - YᵀY) / C² = X m · 2/C²
        return pair.input_grad(torch.bmm(d + unit_y, m * (2.0 / (c * c))), x, grad)

    return value, input_grad


def outer_channel_mmd(pair: UnitPair, with_grad: bool):
    """Poly degree 2, c = 0 through the C×C blocks, its second difference in closed form.

    (a+u+uᵀ+w)² - (a+u)² - (a+uᵀ)² + a² = 2 u uᵀ + w (2a + 2u + 2uᵀ + w), summed over the channel
    pairs with w symmetric: 2 Σ u⊙uᵀ + Σ w⊙(2a + 4u + w). Two temporaries where the general poly
    second difference makes a dozen.
    """
    d, unit_y = pair.d, pair.unit_y
    c = d.shape[1]
    a = torch.bmm(unit_y, unit_y.mT)
    u = torch.bmm(d, unit_y.mT)
    w = torch.bmm(d, d.mT)
    total = 2.0 * (u * u.mT).sum((1, 2)) + batched_dot(w, torch.add(w, a, alpha=2.0).add_(u, alpha=4.0))
    if not with_grad:
        return total / (c * c), None
    # G = 4/C² (xd Y + xx D) with xd = X Dᵀ = uᵀ + w and xx = X Xᵀ = a + u + xd (slopes 2 xx, gap 2 xd).
    # Its component along X_i is X_i·G_i = 4/C² Σ_j (xd (xx - xd) + xx xd)_ij, since X Yᵀ = xx - xd:
    # subtracting it from the diagonals of the C×C factors keeps the backward at two (B, C, N) products.
    xd = w.add_(u.mT)
    xx = a.add_(u).add_(xd)

    def input_grad(x, grad):
        radial = (xd * (2.0 * xx - xd)).sum(-1)
        scale = pair.row_scale(grad) * (4.0 / (c * c))
        on_y, on_d = xd * scale, xx * scale
        on_y.diagonal(dim1=1, dim2=2).sub_(radial * scale.squeeze(-1))
        on_d.diagonal(dim1=1, dim2=2).sub_(radial * scale.squeeze(-1))
        return torch.bmm(on_y, unit_y).baddbmm_(on_d, d)

    return total / (c * c), input_grad
