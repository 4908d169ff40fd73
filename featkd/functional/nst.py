"""Neuron Selectivity Transfer (Huang & Wang 2017): kernel MMD between student and teacher channels.

Each channel's spatial map is flattened and l2-normalised, so a feature is a sample of C vectors in
R^N. The loss is the biased squared MMD

    mean_ij k(s_i, s_j) + mean_ij k(t_i, t_j) - 2 mean_ij k(s_i, t_j)

averaged over the batch. Every kernel is an elementwise function of the batched Gram matrices
(``bmm``), so nothing of size (B, C, C, N) is ever built:

* linear: the MMD is the squared distance of the channel means, O(B·C·N);
* poly with degree=2, c=0 (the paper's kernel): ``||X^T X / Cs - Y^T Y / Ct||_F^2`` through the
  N×N Gram when that is cheaper than the C×C route (and non-negative by construction, so accurate
  when the student is close to the teacher; the C×C route's a + b - 2c form is not);
* every other kernel: the three C×C Gram blocks, with squared distances ``|x|^2 + |y|^2 - 2 x^T y``
  from the true norms (dead channels are zero vectors) clamped at 0.

The teacher is a fixed target: its features are detached and the teacher–teacher term is computed
under ``no_grad``.

Adding a kernel takes one function registered with :func:`register_kernel`; it receives the Gram
entries as ``dot`` and/or the squared distances as ``sq_dist`` (declare the ones you need) plus
its own keyword parameters. A kernel with a ``sigma2`` parameter gets the median heuristic when
``sigma2=None``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._shapes import check_choice, full_precision, resize_pair, unknown_name_error

KERNELS: dict[str, Callable[..., Tensor]] = {}
ROUTES = ("auto", "spatial", "channels")


def register_kernel(name: str):
    """Decorator adding an elementwise kernel ``fn(dot=..., sq_dist=..., **params)`` to :data:`KERNELS`."""

    def add(fn):
        KERNELS[name] = fn
        return fn

    return add


@register_kernel("linear")
def linear_kernel(dot: Tensor) -> Tensor:
    """k(x, y) = x^T y."""
    return dot


@register_kernel("poly")
def poly_kernel(dot: Tensor, *, degree: int = 2, c: float = 0.0) -> Tensor:
    """k(x, y) = (x^T y + c)^degree (the NST paper uses degree=2, c=0)."""
    return (dot + c).pow(degree) if c else dot.pow(degree)


@register_kernel("gaussian")
def gaussian_kernel(sq_dist: Tensor, *, sigma2) -> Tensor:
    """k(x, y) = exp(-|x - y|^2 / (2 sigma2)); a sequence of bandwidths sums one kernel per bandwidth."""
    bandwidths = sigma2 if isinstance(sigma2, (list, tuple)) else (sigma2,)
    out = torch.exp(sq_dist / (-2.0 * bandwidths[0]))
    for s2 in bandwidths[1:]:
        out = out + torch.exp(sq_dist / (-2.0 * s2))
    return out


@functools.lru_cache(maxsize=None)
def kernel_signature(fn) -> tuple[frozenset, frozenset]:
    """(Gram inputs the kernel declares, its keyword parameters)."""
    params = inspect.signature(fn).parameters
    inputs = frozenset(p for p in params if p in ("dot", "sq_dist"))
    options = frozenset(p for p in params if p not in ("dot", "sq_dist"))
    return inputs, options


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


@full_precision
def nst_loss(
    f_s: Tensor,
    f_t: Tensor,
    kernel: str = "poly",
    *,
    degree: int = 2,
    c: float = 0.0,
    sigma2: float | Sequence[float] | None = None,
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
        degree, c: polynomial kernel parameters.
        sigma2: Gaussian bandwidth(s); None uses :func:`median_bandwidth`.
        layout: "channels_first" for (B, C, H, W) / (B, C, N), "tokens" for (B, N, C).
        route: for poly degree=2, c=0 only: "spatial" (N×N Gram difference, cancellation-free),
            "channels" (C×C Gram blocks), or "auto" (the cheaper).
        kernel_options: further keyword parameters of a registered kernel.
    """
    if kernel not in KERNELS:
        raise unknown_name_error("NST kernel", kernel, sorted(KERNELS))
    check_choice("NST route", route, ROUTES)
    x, y = resize_pair(f_s, f_t.detach(), resize, layout)
    if kernel == "linear":
        return _linear_mmd(x, y).mean()
    if kernel == "poly" and degree == 2 and c == 0:
        return spatial_gram_distance(x, y, route, normalize=True).mean()
    fn = KERNELS[kernel]
    inputs, accepted = kernel_signature(fn)
    given = {"degree": degree, "c": c, "sigma2": sigma2, **kernel_options}
    unknown = set(kernel_options) - accepted
    if unknown:
        raise ValueError(f"kernel {kernel!r} takes options {sorted(accepted)}, got unknown {sorted(unknown)}")
    params = {k: v for k, v in given.items() if k in accepted}
    return _gram_mmd(fn, inputs, params, x, y).mean()


# The channels are never normalised as (B, C, N) tensors where a Gram matrix is formed anyway:
# the Gram of the unit rows is the raw Gram scaled by 1/|f_i| 1/|f_j|, with the squared norms read
# off its diagonal. That is O(C²) instead of O(C·N) elementwise work (and its backward), which is
# what dominates when C is small next to N.

_DEAD = 1e-24  # squared norm under which a channel is all-zero (F.normalize's eps, squared)


def inverse_norms(sq_norms: Tensor) -> Tensor:
    """1/|f_c| from squared norms; 0 for dead channels, so they act as zero vectors (no 0·inf in grads)."""
    live = sq_norms > _DEAD
    return torch.where(live, torch.where(live, sq_norms, 1.0).rsqrt(), 0.0)


def _unit_rows(f: Tensor) -> Tensor:
    return f * inverse_norms(f.square().sum(-1)).unsqueeze(-1)


def _unit_gram(gram: Tensor, inv_a: Tensor, inv_b: Tensor) -> Tensor:
    return gram * (inv_a.unsqueeze(2) * inv_b.unsqueeze(1))


def _linear_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Squared distance of the means of the unit rows, as one (B, 1, C) @ (B, C, N) product each."""

    def unit_mean(f):
        weights = inverse_norms(f.square().sum(-1)) / f.shape[1]
        return torch.bmm(weights.unsqueeze(1), f).squeeze(1)

    with torch.no_grad():
        y_mean = unit_mean(y)
    return (unit_mean(x) - y_mean).square().sum(-1)


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


def _gram_mmd(fn, inputs, params, x: Tensor, y: Tensor) -> Tensor:
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
    cross = _kernel_args(inputs | {"sq_dist"} if needs_median else inputs, x, y, n_s, n_t)
    if needs_median:
        params = {**params, "sigma2": median_bandwidth(cross["sq_dist"])}
        cross = {k: v for k, v in cross.items() if k in inputs}
    st = fn(**cross, **params).mean((1, 2))
    del cross
    ss = fn(**_kernel_args(inputs, x, x, n_s, n_s), **params).mean((1, 2))
    with torch.no_grad():
        tt = fn(**_kernel_args(inputs, y, y, n_t, n_t), **params).mean((1, 2))
    return ss + tt - 2.0 * st


def _kernel_args(inputs, a: Tensor, b: Tensor, n_a: Tensor, n_b: Tensor) -> dict[str, Tensor]:
    """The Gram entries ``dot`` and/or squared distances ``sq_dist`` of unit rows a (B, P, N), b (B, Q, N)."""
    args = {}
    if "dot" in inputs:
        args["dot"] = torch.bmm(a, b.transpose(1, 2))
    if "sq_dist" in inputs:
        with torch.no_grad():
            norms = n_a.unsqueeze(2) + n_b.unsqueeze(1)
        if "dot" in args:
            sq = torch.add(norms, args["dot"], alpha=-2.0)
        else:
            sq = torch.baddbmm(norms, a, b.transpose(1, 2), alpha=-2.0)
        # |a|^2 + |b|^2 - 2 a.b, clamped: rounding makes it slightly negative for a == b.
        args["sq_dist"] = sq.clamp_min(0.0)
    return args
