"""Neuron Selectivity Transfer (Huang & Wang 2017): kernel MMD between student and teacher channels.

Each channel's spatial map is flattened and l2-normalised, so a feature is a sample of C vectors in
R^N. The loss is the biased squared MMD

    mean_ij k(s_i, s_j) + mean_ij k(t_i, t_j) - 2 mean_ij k(s_i, t_j)

averaged over the batch. Every kernel is an elementwise function of batched Gram matrices
(``bmm``), so nothing of size (B, C, C, N) is ever built.

Accuracy. Written as above, the three means are O(1) and their difference is O(ε²) when the
student is within ε of the teacher: float32 keeps none of its digits at ε = 1e-4. When student and
teacher have the same channel count, the MMD is computed instead from the *difference* of the unit
channels, D = X - Y, as the mean over channel pairs of the kernel's second difference

    k(x_i, x_j) - k(x_i, y_j) - k(y_i, x_j) + k(y_i, y_j),

which each kernel states in a cancellation-free form (``second_difference``), with a hand-written
backward (:mod:`featkd.functional._nst_paired`: it is also faster than the three means).
Kernels with a small explicit feature map take a cheaper route (``feature_map``): "mean" (linear,
and poly of degree 1: the squared distance of the channel means, whose rounding is first order
only) or "outer" (poly degree 2, c = 0: ``||(XᵀX - YᵀY) / C||²_F`` through the N×N or the C×C
products, whichever is cheaper). With unequal channel counts no channel pairing exists and the
three-mean form is used (the N×N route for poly 2/0, non-negative by construction).

The teacher is a fixed target: its features are detached and teacher-only products run under
``no_grad``.

Adding a kernel takes one function registered with :func:`register_kernel`: it receives the Gram
entries as ``dot`` or the squared distances as ``sq_dist`` (declare the one you need) plus its own
keyword parameters, whose defaults are its own. A kernel with a ``sigma2`` parameter gets the
median heuristic when ``sigma2=None``. Without a ``second_difference`` it is computed by the
three-mean form, under autograd.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._nst_paired import (
    batched_dot,
    block_mmd,
    inverse_norms,
    median_bandwidth,
    outer_channel_mmd,
    outer_spatial_mmd,
    paired_mmd,
)
from ._masks import masked_pair
from .shapes import check_choice, full_precision, unknown_name_error

ROUTES = ("auto", "spatial", "channels")
STRUCTURES = ("dot", "sq_dist")


@dataclass(frozen=True)
class Kernel:
    """A registered NST kernel and what the loss may rely on about it.

    * ``fn(dot=... | sq_dist=..., **params)``: the kernel elementwise on Gram entries or squared
      distances (``structure`` says which).
    * ``second_difference(base, du, dw, with_grad, **params)`` -> ``(total, slope, gap)``, on (B, C, C)
      blocks with f the kernel elementwise and duᵀ du with its last two dimensions swapped:
      ``total`` (B,) sums ``f(base+du+duᵀ+dw) - f(base+du) - f(base+duᵀ) + f(base)`` over the
      block; with ``with_grad``, ``slope = f'(base+du+duᵀ+dw)`` and ``gap = slope - f'(base+du)``
      (else None). All without cancellation; the blocks are the function's to overwrite. None if
      the kernel has none (then the three-mean form is used).
    * ``feature_map(params)``: "mean" or "outer" when the kernel with these parameters has that
      explicit feature map (see the module docstring), else None.
    * ``check(params)``: raises ValueError for parameters that do not give a positive definite
      kernel (a squared MMD is never negative).
    """

    name: str
    fn: Callable[..., Tensor]
    structure: str
    defaults: Mapping[str, Any]
    second_difference: Callable[..., tuple[Tensor, Tensor | None, Tensor | None]] | None = None
    feature_map: Callable[[Mapping[str, Any]], str | None] | None = None
    check: Callable[[Mapping[str, Any]], None] | None = None

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The kernel's parameters: its defaults updated by ``options``, checked."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"NST kernel {self.name!r} takes options {sorted(self.defaults)}, "
                             f"got unknown {sorted(unknown)}")
        params = {**self.defaults, **options}
        if self.check is not None:
            self.check(params)
        return params


KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str, *, second_difference=None, feature_map=None, check=None):
    """Decorator adding an elementwise kernel ``fn(dot=... or sq_dist=..., **params)`` to :data:`KERNELS`."""

    def add(fn):
        params = inspect.signature(fn).parameters
        inputs = [p for p in params if p in STRUCTURES]
        if len(inputs) != 1:
            raise ValueError(f"kernel {name!r} must take exactly one of {STRUCTURES}, got {inputs}")
        defaults = {p: (None if v.default is inspect.Parameter.empty else v.default)
                    for p, v in params.items() if p not in STRUCTURES}
        KERNELS[name] = Kernel(name, fn, inputs[0], defaults, second_difference, feature_map, check)
        return fn

    return add


# ----------------------------------------------------------------------------- the built-in kernels


@register_kernel("linear", feature_map=lambda params: "mean")
def linear_kernel(dot: Tensor) -> Tensor:
    """k(x, y) = x^T y."""
    return dot


def _power_sum(a, b, m):
    """Σ_{k=0}^{m} a^k b^(m-k) for m ≥ 1, by Horner's rule in a."""
    h, b_pow = a + b, b
    for _ in range(m - 1):
        b_pow = b_pow * b
        h = torch.addcmul(b_pow, a, h)
    return h


def _poly_difference(base, du, dw, with_grad, *, degree, c):
    # h(z) = (b + z)^p with b = base + c, p = degree ≥ 2 (degree 1 has the "mean" feature map):
    #   h(u+v+w) - h(u+v)              = w · Σ_k (b+u+v+w)^k (b+u+v)^(p-1-k)
    #   h(u+v) - h(u) - h(v) + h(0)    = Σ_{k≥2} C(p,k) b^(p-k) Σ_{0<m<k} C(k,m) u^m v^(k-m)
    #   h'(u+v+w) - h'(u)              = p (v+w) Σ_k (b+u+v+w)^k (b+u)^(p-2-k)
    # Every term is a product with a small quantity (w, v, or u and v together): no cancellation.
    p = degree
    dv = du.mT
    b = base.add_(c) if c else base
    xy = b + du
    uv = xy + dv
    xx = uv + dw
    total = batched_dot(dw, _power_sum(xx, uv, p - 1))
    for k in range(2, p + 1):
        cross = sum(math.comb(k, m) * du.pow(m) * dv.pow(k - m) for m in range(1, k))
        if k < p:
            cross = cross * b.pow(p - k)
        total = total + math.comb(p, k) * cross.sum((1, 2))
    if not with_grad:
        return total, None, None
    gap = dw.add_(dv).mul_(p)
    if p > 2:
        gap.mul_(_power_sum(xx, xy, p - 2))
    return total, xx.pow_(p - 1).mul_(p), gap


def _poly_feature_map(params):
    # Degree 1 is the linear kernel plus a constant, which cancels in the MMD; degree 2 with c = 0 is
    # the outer product x xᵀ (the NST paper's kernel).
    if params["degree"] == 1:
        return "mean"
    return "outer" if params["degree"] == 2 and params["c"] == 0 else None


def _check_poly(params):
    degree, c = params["degree"], params["c"]
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"NST poly kernel: degree must be a positive integer, got {degree!r}")
    if not c >= 0:
        raise ValueError(f"NST poly kernel: c must be >= 0 (the kernel is not positive definite otherwise), got {c!r}")


@register_kernel("poly", second_difference=_poly_difference, feature_map=_poly_feature_map, check=_check_poly)
def poly_kernel(dot: Tensor, *, degree: int = 2, c: float = 0.0) -> Tensor:
    """k(x, y) = (x^T y + c)^degree (the NST paper uses degree=2, c=0)."""
    return (dot + c).pow(degree) if c else dot.pow(degree)


def _bandwidths(sigma2):
    return sigma2 if isinstance(sigma2, (list, tuple)) else (sigma2,)


def _gaussian_difference(base, du, dw, with_grad, *, sigma2):
    # With a = -1/(2σ²), k_yy = exp(a·base), E = expm1(a·du), F = expm1(a·dw):
    #   k_xy = k_yy (1 + E),  k_yx = k_yy (1 + Eᵀ),  k_xx = k_yy (1 + E)(1 + Eᵀ)(1 + F)
    #   k_xx - k_xy - k_yx + k_yy = k_yy E Eᵀ + k_xy (1 + Eᵀ) F
    #   f'(xx) - f'(xy) = a (k_xx - k_xy) = a k_xy (Eᵀ + (1 + Eᵀ) F),   f'(xx) = that + a k_xy
    # Everything happens in place, in the blocks themselves for the last bandwidth: at C ≥ 256 every
    # fresh (B, C, C) tensor costs page faults worth more than its arithmetic.
    total, slope, gap = 0, None, None
    bandwidths = _bandwidths(sigma2)
    for i, s2 in enumerate(bandwidths):
        a = -0.5 / s2
        if i == len(bandwidths) - 1:
            k, e, f = base.mul_(a).exp_(), du.mul_(a).expm1_(), dw.mul_(a).expm1_()
        else:
            k, e, f = (base * a).exp_(), (du * a).expm1_(), (dw * a).expm1_()
        e_t = e.mT.contiguous()
        f.addcmul_(e_t, f)  # (1 + Eᵀ) F
        e.mul_(k)  # k_yy E
        total = total + batched_dot(e, e_t)
        k.add_(e)  # k_xy
        total = total + batched_dot(k, f)
        if with_grad:
            g = f.add_(e_t).mul_(k).mul_(a)
            s = k.mul_(a).add_(g)
            slope, gap = (s, g) if slope is None else (slope.add_(s), gap.add_(g))
    return total, slope, gap


def _check_gaussian(params):
    sigma2 = params["sigma2"]
    if sigma2 is None:
        return
    values = _bandwidths(sigma2)
    if not values or any(isinstance(s, Tensor) and s.numel() != 1 for s in values) or not all(float(s) > 0 for s in values):
        raise ValueError(f"NST gaussian kernel: sigma2 must be > 0 (or a list of values > 0, or None for the "
                         f"median heuristic), got {sigma2!r}")


@register_kernel("gaussian", second_difference=_gaussian_difference, check=_check_gaussian)
def gaussian_kernel(sq_dist: Tensor, *, sigma2=None) -> Tensor:
    """k(x, y) = exp(-|x - y|^2 / (2 sigma2)); a sequence of bandwidths sums one kernel per bandwidth."""
    out = 0
    for s2 in _bandwidths(sigma2):
        out = out + torch.exp(sq_dist * (-0.5 / s2))
    return out


# ----------------------------------------------------------------------------- the loss


@full_precision
def nst_loss(
    f_s: Tensor,
    f_t: Tensor,
    kernel: str = "poly",
    *,
    resize: str | None = None,
    layout: str = "channels_first",
    route: str = "auto",
    mask: Tensor | None = None,
    **kernel_options,
) -> Tensor:
    """NST loss: biased squared kernel MMD between student and teacher channels, batch mean.

    Args:
        f_s, f_t: student / teacher features; channel counts may differ, spatial sizes must match
            unless ``resize`` is ``"pool"`` or ``"interpolate"``.
        kernel: a name in :data:`KERNELS` ("linear", "poly", "gaussian", or one you registered).
        layout: "channels_first" for (B, C, H, W) / (B, C, N), "tokens" for (B, N, C).
        route: for kernels with the "outer" feature map (poly degree 2, c = 0): "spatial" (N×N),
            "channels" (C×C), or "auto" (the cheaper).
        kernel_options: the kernel's parameters — ``degree``, ``c`` (poly, default 2 and 0),
            ``sigma2`` (gaussian: a value > 0, a list of them, or None for the median heuristic).
        mask: optional (B, N) token mask, True (or 1) for a valid position (:mod:`featkd.functional._masks`).
            Padded positions are zeroed in both features, so each channel is l2-normalised over the valid
            positions only and every route (the paired one with its hand-written backward included)
            gives each sample's MMD as if it came without its padding; the MMD has no mean over
            positions. The median heuristic remains one bandwidth per batch.
    """
    if kernel not in KERNELS:
        raise unknown_name_error("NST kernel", kernel, sorted(KERNELS))
    check_choice("NST route", route, ROUTES)
    spec = KERNELS[kernel]
    params = spec.resolve(kernel_options)
    x, y, _ = masked_pair(f_s, f_t.detach(), mask, resize, layout, "nst_loss")
    feature_map = spec.feature_map(params) if spec.feature_map else None
    if feature_map == "mean":
        # The squared distance of the channel means: first-order rounding only, never negative.
        return _linear_mmd(x, y).mean()
    if x.shape[1] == y.shape[1] and (feature_map or spec.second_difference):
        return _paired_mmd(spec, params, feature_map, route, x, y).mean()
    if feature_map == "outer":
        return spatial_gram_distance(x, y, "spatial" if route == "auto" else route, normalize=True).mean()
    return _three_mean_mmd(spec, params, x, y).mean()


def _paired_mmd(spec: Kernel, params: dict, feature_map: str | None, route: str, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample MMD from D = X - Y (equal channel counts): see the module docstring."""
    c, n = x.shape[1], x.shape[2]
    differentiable = functools.partial(_three_mean_mmd, spec, params, y=y)
    # The N×N products cost 2·N²·C multiply-adds (forward and backward), the C×C blocks 5·C²·N.
    if feature_map == "outer":
        spatial = route == "spatial" or (route == "auto" and 2 * n < 5 * c)
        return paired_mmd(x, y, outer_spatial_mmd if spatial else outer_channel_mmd, differentiable)
    return paired_mmd(x, y, block_mmd(spec, params), differentiable)


# The channels are never normalised as (B, C, N) tensors where a Gram matrix is formed anyway on the
# unpaired route: the Gram of the unit rows is the raw Gram scaled by 1/|f_i| 1/|f_j|, with the
# squared norms read off its diagonal.

def _unit_rows(f: Tensor) -> Tensor:
    return f * inverse_norms(f.square().sum(-1)).unsqueeze(-1)


def _unit_gram(gram: Tensor, inv_a: Tensor, inv_b: Tensor) -> Tensor:
    return gram * (inv_a.unsqueeze(2) * inv_b.unsqueeze(1))


def spatial_gram_distance(x: Tensor, y: Tensor, route: str = "auto", *, normalize: bool = True) -> Tensor:
    """Per-sample ``||X^T X / Cs - Y^T Y / Ct||_F^2`` for x (B, Cs, N), y (B, Ct, N); y is a fixed target.

    X, Y are x, y with l2-normalised rows when ``normalize`` (then this is the poly degree 2, c=0
    MMD), else x, y themselves. "spatial" forms the N×N difference (one fused ``baddbmm``,
    non-negative by construction); "channels" uses the C×C Gram blocks (a + b - 2c: loses digits
    when x is close to y); "auto" picks the route with fewer multiply-adds.
    """
    _, cs, n = x.shape
    ct = y.shape[1]
    if route == "auto":
        route = "spatial" if n * (cs + ct) <= cs * cs + cs * ct + ct * ct else "channels"
    if route == "spatial":
        if normalize:
            x = _unit_rows(x)
        with torch.no_grad():
            y = _unit_rows(y) if normalize else y
            target = torch.bmm(y.transpose(1, 2), y).div_(ct)
        diff = torch.baddbmm(target, x.transpose(1, 2), x, beta=-1.0, alpha=1.0 / cs)
        return batched_dot(diff, diff)
    g_ss = torch.bmm(x, x.transpose(1, 2))
    g_st = torch.bmm(x, y.transpose(1, 2))
    with torch.no_grad():
        g_tt = torch.bmm(y, y.transpose(1, 2))
        if normalize:
            inv_t = inverse_norms(g_tt.diagonal(dim1=1, dim2=2))
            g_tt = _unit_gram(g_tt, inv_t, inv_t)
        tt = batched_dot(g_tt, g_tt) / (ct * ct)
    if normalize:
        inv_s = inverse_norms(g_ss.diagonal(dim1=1, dim2=2))
        g_ss, g_st = _unit_gram(g_ss, inv_s, inv_s), _unit_gram(g_st, inv_s, inv_t)
    return batched_dot(g_ss, g_ss) / (cs * cs) + tt - 2.0 * batched_dot(g_st, g_st) / (cs * ct)


def _three_mean_mmd(spec: Kernel, params: dict, x: Tensor, y: Tensor) -> Tensor:
    """mean k(X,X) + mean k(Y,Y) - 2 mean k(X,Y) per sample (unequal channel counts, or a kernel without
    a second difference)."""
    # Every elementwise pass over a (B, C, C) block costs as much as the block's bmm here, so the
    # rows are normalised once (O(C·N)) and squared distances come out of one fused baddbmm.
    inv_s = inverse_norms(x.square().sum(-1))
    x = x * inv_s.unsqueeze(-1)
    with torch.no_grad():
        inv_t = inverse_norms(y.square().sum(-1))
        y = y * inv_t.unsqueeze(-1)
    # True squared norms of the unit rows: 1 for live channels, 0 for dead ones.
    n_s, n_t = (inv_s > 0).to(x.dtype), (inv_t > 0).to(y.dtype)
    needs_median = "sigma2" in params and params["sigma2"] is None
    cross = _kernel_input(spec.structure, x, y, n_s, n_t)
    if needs_median:
        params = {**params, "sigma2": median_bandwidth(cross)}
    st = spec.fn(**{spec.structure: cross}, **params).mean((1, 2))
    del cross
    ss = spec.fn(**{spec.structure: _kernel_input(spec.structure, x, x, n_s, n_s)}, **params).mean((1, 2))
    with torch.no_grad():
        tt = spec.fn(**{spec.structure: _kernel_input(spec.structure, y, y, n_t, n_t)}, **params).mean((1, 2))
    return ss + tt - 2.0 * st


def _linear_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Squared distance of the means of the unit rows, as one (B, 1, C) @ (B, C, N) product each."""

    def unit_mean(f):
        weights = inverse_norms(f.square().sum(-1)) / f.shape[1]
        return torch.bmm(weights.unsqueeze(1), f).squeeze(1)

    with torch.no_grad():
        y_mean = unit_mean(y)
    return (unit_mean(x) - y_mean).square().sum(-1)


def _kernel_input(structure: str, a: Tensor, b: Tensor, n_a: Tensor, n_b: Tensor) -> Tensor:
    """The Gram entries (``dot``) or squared distances (``sq_dist``) of unit rows a (B, P, N), b (B, Q, N)."""
    if structure == "dot":
        return torch.bmm(a, b.transpose(1, 2))
    with torch.no_grad():
        norms = n_a.unsqueeze(2) + n_b.unsqueeze(1)
    # |a|^2 + |b|^2 - 2 a.b, clamped: rounding makes it slightly negative for a == b.
    return torch.baddbmm(norms, a, b.transpose(1, 2), alpha=-2.0).clamp_min(0.0)
