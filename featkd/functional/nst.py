"""Neuron Selectivity Transfer (Huang & Wang 2017): kernel MMD between student and teacher channels.

Each channel's spatial map is flattened and l2-normalised, so a feature is a sample of C vectors in
R^N. The loss is the biased squared MMD

    mean_ij k(s_i, s_j) + mean_ij k(t_i, t_j) - 2 mean_ij k(s_i, t_j)

averaged over the batch. Every kernel is an elementwise function of batched Gram matrices
(``bmm``), so nothing of size (B, C, C, N) is ever built.

Accuracy. Written as above, the three means are O(1) and their difference is O(ε²) when the
student is within ε of the teacher: float32 keeps none of its digits at ε = 1e-4. When student and
teacher have the same channel count, the MMD is computed instead from the *difference* of the unit
channels, D = X - Y (:func:`unit_difference`), as the mean over channel pairs of the kernel's
second difference

    k(x_i, x_j) - k(x_i, y_j) - k(y_i, x_j) + k(y_i, y_j),

which each kernel states in a cancellation-free form (``second_difference``). Kernels with a small
explicit feature map take a cheaper route (``feature_map``): "mean" (linear: the squared distance
of the channel means, whose rounding is first order only) or "outer" (poly degree 2, c = 0: ``||(XᵀX - YᵀY) / C||²_F`` through the N×N or the
C×C products, whichever is cheaper). With unequal channel counts no channel pairing exists and the
three-mean form is used (the N×N route for poly 2/0, non-negative by construction).

The teacher is a fixed target: its features are detached and teacher-only products run under
``no_grad``.

Adding a kernel takes one function registered with :func:`register_kernel`: it receives the Gram
entries as ``dot`` or the squared distances as ``sq_dist`` (declare the one you need) plus its own
keyword parameters, whose defaults are its own. A kernel with a ``sigma2`` parameter gets the
median heuristic when ``sigma2=None``. Without a ``second_difference`` it is computed by the
three-mean form.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._shapes import check_choice, full_precision, resize_pair, unknown_name_error

ROUTES = ("auto", "spatial", "channels")
STRUCTURES = ("dot", "sq_dist")


@dataclass(frozen=True)
class Kernel:
    """A registered NST kernel and what the loss may rely on about it.

    * ``fn(dot=... | sq_dist=..., **params)``: the kernel elementwise on Gram entries or squared
      distances (``structure`` says which).
    * ``second_difference(base, du, dw, **params)``: ``f(base+du+duᵀ+dw) - f(base+du) -
      f(base+duᵀ) + f(base)`` for the kernel's elementwise ``f`` on (B, C, C) blocks (duᵀ: du with
      its last two dimensions swapped), without cancellation; None if the kernel has none (then the
      three-mean form is used).
    * ``feature_map(params)``: "mean" or "outer" when the kernel with these parameters has that
      explicit feature map (see the module docstring), else None.
    * ``check(params)``: raises ValueError for parameters that do not give a positive definite
      kernel (a squared MMD is never negative).
    """

    name: str
    fn: Callable[..., Tensor]
    structure: str
    defaults: Mapping[str, Any]
    second_difference: Callable[..., Tensor] | None = None
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


def _poly_difference(base, du, dw, *, degree, c):
    # h(z) = (b + z)^p with b = base + c:
    #   h(u+v+w) - h(u+v)              = w · Σ_k (b+u+v+w)^k (b+u+v)^(p-1-k)
    #   h(u+v) - h(u) - h(v) + h(0)    = Σ_{k≥2} C(p,k) b^(p-k) Σ_{0<m<k} C(k,m) u^m v^(k-m)
    # Every term is a product with a small quantity (w, or u and v together): no cancellation.
    dv = du.transpose(1, 2)
    b = base + c if c else base
    uv, full = b + du + dv, b + du + dv + dw
    first = sum(full.pow(k) * uv.pow(degree - 1 - k) for k in range(degree))
    out = dw * first
    for k in range(2, degree + 1):
        cross = sum(math.comb(k, m) * du.pow(m) * dv.pow(k - m) for m in range(1, k))
        out = out + math.comb(degree, k) * b.pow(degree - k) * cross
    return out


def _check_poly(params):
    degree, c = params["degree"], params["c"]
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"NST poly kernel: degree must be a positive integer, got {degree!r}")
    if not c >= 0:
        raise ValueError(f"NST poly kernel: c must be >= 0 (the kernel is not positive definite otherwise), got {c!r}")


@register_kernel("poly", second_difference=_poly_difference, check=_check_poly,
                 feature_map=lambda params: "outer" if params["degree"] == 2 and params["c"] == 0 else None)
def poly_kernel(dot: Tensor, *, degree: int = 2, c: float = 0.0) -> Tensor:
    """k(x, y) = (x^T y + c)^degree (the NST paper uses degree=2, c=0)."""
    return (dot + c).pow(degree) if c else dot.pow(degree)


def _bandwidths(sigma2):
    return sigma2 if isinstance(sigma2, (list, tuple)) else (sigma2,)


def _gaussian_difference(base, du, dw, *, sigma2):
    # exp(a·(Q+α+αᵀ+γ)) - exp(a·(Q+α)) - exp(a·(Q+αᵀ)) + exp(a·Q)
    #   = exp(aQ) [E Eᵀ + (1 + E)(1 + Eᵀ) expm1(aγ)],   E = expm1(aα),  a = -1 / (2σ²)
    out = 0
    for s2 in _bandwidths(sigma2):
        scale = -0.5 / s2
        e_u = torch.expm1(du * scale)
        e_v = e_u.transpose(1, 2)
        with torch.no_grad():
            k_base = torch.exp(base * scale)
        out = out + k_base * torch.addcmul(e_u * e_v, (1 + e_u) * (1 + e_v), torch.expm1(dw * scale))
    return out


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
    """
    if kernel not in KERNELS:
        raise unknown_name_error("NST kernel", kernel, sorted(KERNELS))
    check_choice("NST route", route, ROUTES)
    spec = KERNELS[kernel]
    params = spec.resolve(kernel_options)
    x, y = resize_pair(f_s, f_t.detach(), resize, layout)
    feature_map = spec.feature_map(params) if spec.feature_map else None
    if feature_map == "mean":
        # The squared distance of the channel means: first-order rounding only, never negative.
        return _linear_mmd(x, y).mean()
    if x.shape[1] == y.shape[1] and (feature_map or spec.second_difference):
        return _paired_mmd(spec, params, feature_map, route, x, y).mean()
    if feature_map == "outer":
        return spatial_gram_distance(x, y, "spatial" if route == "auto" else route, normalize=True).mean()
    return _three_mean_mmd(spec, params, x, y).mean()


# The channels are never normalised as (B, C, N) tensors where a Gram matrix is formed anyway on the
# unpaired route: the Gram of the unit rows is the raw Gram scaled by 1/|f_i| 1/|f_j|, with the
# squared norms read off its diagonal.

_DEAD = 1e-24  # squared norm under which a channel is all-zero (F.normalize's eps, squared)


def inverse_norms(sq_norms: Tensor) -> Tensor:
    """1/|f_c| from squared norms; 0 for dead channels, so they act as zero vectors (no 0·inf in grads)."""
    live = sq_norms > _DEAD
    return torch.where(live, torch.where(live, sq_norms, 1.0).rsqrt(), 0.0)


def _unit_rows(f: Tensor) -> Tensor:
    return f * inverse_norms(f.square().sum(-1)).unsqueeze(-1)


def _unit_gram(gram: Tensor, inv_a: Tensor, inv_b: Tensor) -> Tensor:
    return gram * (inv_a.unsqueeze(2) * inv_b.unsqueeze(1))


def unit_difference(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(D, Y, live_x, live_y): D = x/|x| - y/|y| per row, Y = y/|y| (no grad); dead rows are zero vectors.

    D's own rounding is first order: about 1e-7/eps relative when x is within eps of y (3.5e-4 measured
    at eps = 1e-4), against the 1e-7/eps² of the three-mean form. Forming it without any cancellation
    ((x - y)/|x| + y (1/|x| - 1/|y|)) took 1.3–2.6× the time of the whole loss at C = 16, N = 1024.
    """
    inv_x = inverse_norms(x.square().sum(-1))
    with torch.no_grad():
        inv_y = inverse_norms(y.square().sum(-1))
        unit_y = y * inv_y.unsqueeze(-1)
    # One fused pass: x · (1/|x|) - Y.
    return torch.addcmul(-unit_y, x, inv_x.unsqueeze(-1)), unit_y, inv_x > 0, inv_y > 0


def _paired_mmd(spec: Kernel, params: dict, feature_map: str | None, route: str, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample MMD from D = X - Y (equal channel counts): see the module docstring."""
    c, n = x.shape[1], x.shape[2]
    d, unit_y, live_x, live_y = unit_difference(x, y)
    if feature_map == "outer" and (route == "spatial" or (route == "auto" and n < c)):
        # XᵀX - YᵀY = DᵀY + YᵀD + DᵀD  (N×N)
        p = torch.bmm(d.transpose(1, 2), unit_y)
        diff = torch.baddbmm(p + p.transpose(1, 2), d.transpose(1, 2), d)
        return _sq_frobenius(diff) / (c * c)
    # Gram blocks in increments: x_i·y_j = a + u_ij, y_i·x_j = a + u_ji, x_i·x_j = a + u_ij + u_ji + w_ij.
    with torch.no_grad():
        a = torch.bmm(unit_y, unit_y.transpose(1, 2))
    u, w = torch.bmm(d, torch.cat([unit_y, d], 1).transpose(1, 2)).split(c, dim=2)  # one product for both
    if spec.structure == "dot":
        base, du, dw = a, u, w
    else:
        # |p|² + |q|² - 2 p·q with |.|² ∈ {0, 1} (dead or live); the student's norms change by e.
        n_y = live_y.to(a.dtype)
        e = live_x.to(a.dtype) - n_y
        with torch.no_grad():
            base = (n_y.unsqueeze(2) + n_y.unsqueeze(1) - 2 * a).clamp_min(0.0)
        du = e.unsqueeze(2) - 2 * u
        dw = -2 * w
        if "sigma2" in params and params["sigma2"] is None:
            params = {**params, "sigma2": median_bandwidth((base + du).clamp_min(0.0))}
    return spec.second_difference(base, du, dw, **params).mean((1, 2))


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
        return _sq_frobenius(diff)
    g_ss = torch.bmm(x, x.transpose(1, 2))
    g_st = torch.bmm(x, y.transpose(1, 2))
    with torch.no_grad():
        g_tt = torch.bmm(y, y.transpose(1, 2))
        if normalize:
            inv_t = inverse_norms(g_tt.diagonal(dim1=1, dim2=2))
            g_tt = _unit_gram(g_tt, inv_t, inv_t)
        tt = _sq_frobenius(g_tt) / (ct * ct)
    if normalize:
        inv_s = inverse_norms(g_ss.diagonal(dim1=1, dim2=2))
        g_ss, g_st = _unit_gram(g_ss, inv_s, inv_s), _unit_gram(g_st, inv_s, inv_t)
    return _sq_frobenius(g_ss) / (cs * cs) + tt - 2.0 * _sq_frobenius(g_st) / (cs * ct)


def _sq_frobenius(m: Tensor) -> Tensor:
    """Per-sample sum of squares of a (B, P, Q) batch as a batched dot product (no squared temporary)."""
    flat = m.reshape(m.shape[0], 1, -1)
    return torch.bmm(flat, flat.transpose(1, 2)).view(-1)


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
