"""Thin ``nn.Module`` wrappers around :mod:`featkd.functional` and the loss registries.

``build_feature_loss(name, student_shape, teacher_shape, **options)`` checks the shapes (full
tensor shapes from a dry-run forward, batch dimension included) and the options when the loss is
built, so a mismatch is reported before training starts. ``build_logit_loss(name, **options)``
does the same for the logit terms. Unknown names and options get close-match suggestions.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from . import functional as KF
from .functional.logits import check_temperature
from .functional._shapes import channels, check_choice, check_spatial, unknown_name_error

Shape = Sequence[int]


class NSTLoss(nn.Module):
    """Neuron Selectivity Transfer: kernel MMD between channels (see :func:`featkd.functional.nst_loss`)."""

    def __init__(self, kernel="poly", *, resize=None, layout="channels_first", route="auto", **kernel_options):
        super().__init__()
        if kernel not in KF.KERNELS:
            raise unknown_name_error("NST kernel", kernel, sorted(KF.KERNELS))
        spec = KF.KERNELS[kernel]
        for key in kernel_options:
            if key not in spec.defaults:
                known = sorted(set(spec.defaults) | {"resize", "layout", "route"})
                raise unknown_name_error(f"NST kernel {kernel!r} option", key, known)
        spec.resolve(kernel_options)  # invalid parameters are refused when the loss is built
        check_choice("NST route", route, KF.nst.ROUTES)
        self.kernel = kernel
        self.options = dict(resize=resize, layout=layout, route=route, **kernel_options)

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        check_spatial(student_shape, teacher_shape, self.options["resize"], self.options["layout"])

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return KF.nst_loss(f_s, f_t, self.kernel, **self.options)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class ATLoss(nn.Module):
    """Attention Transfer (see :func:`featkd.functional.at_loss`)."""

    def __init__(self, p=2, *, mode="official", q=2, resize=None, layout="channels_first"):
        super().__init__()
        check_choice("AT mode", mode, KF.AT_MODES)
        KF.at_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), p, mode=mode, q=q)  # refuses bad exponents now
        self.p, self.mode, self.q, self.resize, self.layout = p, mode, q, resize, layout

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        check_spatial(student_shape, teacher_shape, self.resize, self.layout)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return KF.at_loss(f_s, f_t, self.p, mode=self.mode, q=self.q, resize=self.resize, layout=self.layout)


class GramLoss(nn.Module):
    """Spatial or channel Gram matching (see :func:`featkd.functional.gram_loss`)."""

    def __init__(self, *, mode="spatial", normalize=False, resize=None, layout="channels_first", route="auto"):
        super().__init__()
        check_choice("Gram mode", mode, KF.GRAM_MODES)
        self.options = dict(mode=mode, normalize=normalize, resize=resize, layout=layout, route=route)

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        layout = self.options["layout"]
        if self.options["mode"] == "spatial":
            check_spatial(student_shape, teacher_shape, self.options["resize"], layout)
        elif channels(student_shape, layout, "student") != channels(teacher_shape, layout, "teacher"):
            raise ValueError(
                f"channel Gram needs equal channel counts: student {tuple(student_shape)} vs teacher "
                f"{tuple(teacher_shape)}; use mode='spatial' or a hint regressor"
            )

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return KF.gram_loss(f_s, f_t, **self.options)


class FSPLoss(nn.Module):
    """FSP matrices between two layers of each network (see :func:`featkd.functional.fsp_loss`).

    ``forward(f_s, f_t)`` takes a pair of features per network; the build shapes are pairs too.
    """

    def __init__(self, *, resize=None, layout="channels_first"):
        super().__init__()
        self.resize, self.layout = resize, layout

    def check_shapes(self, student_shape: Sequence[Shape], teacher_shape: Sequence[Shape]) -> None:
        if len(student_shape) != 2 or len(teacher_shape) != 2 or not all(
            isinstance(s, (tuple, list, torch.Size)) for s in (*student_shape, *teacher_shape)
        ):
            raise ValueError(
                f"FSP needs a pair of layer shapes per network, got student {student_shape} and teacher {teacher_shape}"
            )
        for pair in (student_shape, teacher_shape):  # the two layers of one network
            check_spatial(pair[0], pair[1], self.resize, self.layout)
        c_s = [channels(s, self.layout, "student") for s in student_shape]
        c_t = [channels(s, self.layout, "teacher") for s in teacher_shape]
        if c_s != c_t:
            raise ValueError(
                f"FSP needs equal channel counts layer by layer: student layers {[tuple(s) for s in student_shape]} "
                f"(channels {c_s}) vs teacher layers {[tuple(s) for s in teacher_shape]} (channels {c_t})"
            )

    def forward(self, f_s: Sequence[Tensor], f_t: Sequence[Tensor]) -> Tensor:
        return KF.fsp_loss(f_s, f_t, resize=self.resize, layout=self.layout)


class HintLoss(nn.Module):
    """FitNets hint: a learnable regressor maps the student feature to the teacher's shape, then MSE.

    The regressor (a ``kernel_size`` conv for maps, a linear layer for (B, C, N) or tokens, plus
    BatchNorm when ``batch_norm``) is built when the channel counts differ, or always with
    ``regressor=True``. Different spatial sizes need ``resize`` ("pool" or "interpolate"),
    applied to the regressed student.
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, kernel_size: int = 1, *,
                 batch_norm: bool = False, regressor: bool | None = None, resize=None,
                 layout: str = "channels_first"):
        super().__init__()
        self.check_shapes(student_shape, teacher_shape, resize, layout)
        c_s, c_t = channels(student_shape, layout, "student"), channels(teacher_shape, layout, "teacher")
        self.teacher_shape, self.resize, self.layout = tuple(teacher_shape), resize, layout
        self.regressor = None
        if regressor or (regressor is None and c_s != c_t):
            if len(student_shape) == 4 and layout == "channels_first":
                if kernel_size % 2 != 1:
                    raise ValueError(f"HintLoss kernel_size must be odd to keep the spatial size, got {kernel_size}")
                layers = [nn.Conv2d(c_s, c_t, kernel_size, padding=kernel_size // 2, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(c_t)] if batch_norm else []
            else:
                if kernel_size != 1:
                    raise ValueError(f"HintLoss on flattened maps or tokens takes kernel_size=1, got {kernel_size}")
                layers = [_ChannelLinear(c_s, c_t, layout, bias=not batch_norm)]
                layers += [_ChannelBatchNorm(c_t, layout)] if batch_norm else []
            self.regressor = nn.Sequential(*layers)

    @staticmethod
    def check_shapes(student_shape: Shape, teacher_shape: Shape, resize=None, layout="channels_first") -> None:
        if len(student_shape) != len(teacher_shape):
            raise ValueError(f"hint: student {tuple(student_shape)} and teacher {tuple(teacher_shape)} differ in rank")
        check_spatial(student_shape, teacher_shape, resize, layout)
        if resize == "pool" and any(s < t for s, t in zip(student_shape[2:], teacher_shape[2:])):
            raise ValueError(
                f"hint resize='pool' shrinks the student to the teacher's size, but student {tuple(student_shape)} is "
                f"smaller than teacher {tuple(teacher_shape)}; use resize='interpolate'"
            )

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        if self.regressor is not None:
            f_s = self.regressor(f_s)
        if f_s.dim() == 4 and f_s.shape[2:] != f_t.shape[2:]:
            if self.resize == "pool":
                f_s = nn.functional.adaptive_avg_pool2d(f_s, f_t.shape[2:])
            else:
                f_s = nn.functional.interpolate(f_s, size=f_t.shape[2:], mode="bilinear", align_corners=False)
        return KF.hint_loss(f_s, f_t)


class _ChannelLinear(nn.Linear):
    """Linear map of the channel dimension of (B, C, N) maps or (B, N, C) tokens."""

    def __init__(self, c_in, c_out, layout, bias=True):
        super().__init__(c_in, c_out, bias=bias)
        self.layout = layout

    def forward(self, f):
        return super().forward(f) if self.layout == "tokens" else super().forward(f.transpose(1, 2)).transpose(1, 2)


class _ChannelBatchNorm(nn.BatchNorm1d):
    def __init__(self, c, layout):
        super().__init__(c)
        self.layout = layout

    def forward(self, f):
        return super().forward(f) if self.layout != "tokens" else super().forward(f.transpose(1, 2)).transpose(1, 2)


class KDLoss(nn.Module):
    """Hinton's KD term alone (see :func:`featkd.functional.kd_loss`)."""

    def __init__(self, T: float = 4.0):
        super().__init__()
        check_temperature(T)
        self.T = T

    def forward(self, student_logits, teacher_logits, targets=None):
        return KF.kd_loss(student_logits, teacher_logits, self.T)


class KDCELoss(nn.Module):
    """(alpha · KD + beta · CE) / (alpha + beta); targets == -1 are unlabeled."""

    def __init__(self, T: float = 4.0, alpha: float = 0.9, beta: float = 0.1):
        super().__init__()
        check_temperature(T)
        self.T, self.alpha, self.beta = T, alpha, beta

    def forward(self, student_logits, teacher_logits, targets=None):
        if targets is None:
            raise ValueError("kd_ce needs targets (use -1 for unlabeled samples, or the 'kd' loss without labels)")
        return KF.kd_ce_loss(student_logits, teacher_logits, targets, self.T, self.alpha, self.beta)


class LogitMSELoss(nn.Module):
    """Logit matching (see :func:`featkd.functional.logit_mse_loss`)."""

    def forward(self, student_logits, teacher_logits, targets=None):
        return KF.logit_mse_loss(student_logits, teacher_logits)


class SoftCEMSELoss(nn.Module):
    """Soft cross-entropy / logit-MSE interpolation (see :func:`featkd.functional.soft_ce_mse_loss`)."""

    def __init__(self, T: float = 4.0, lam: float = 0.5):
        super().__init__()
        check_temperature(T)
        self.T, self.lam = T, lam

    def forward(self, student_logits, teacher_logits, targets=None):
        return KF.soft_ce_mse_loss(student_logits, teacher_logits, self.T, self.lam)


class SymKLLoss(nn.Module):
    """Symmetric KL, or with ``one_sided=True`` DML's KL(p_other || p_self) with the other detached."""

    def __init__(self, T: float = 1.0, one_sided: bool = False):
        super().__init__()
        check_temperature(T)
        self.T, self.one_sided = T, one_sided

    def forward(self, student_logits, teacher_logits, targets=None):
        if self.one_sided:
            return KF.dml_kl_loss(student_logits, teacher_logits, self.T)
        return KF.sym_kl_loss(student_logits, teacher_logits, self.T)


FEATURE_LOSSES: dict[str, type[nn.Module]] = {
    "nst": NSTLoss,
    "at": ATLoss,
    "gram": GramLoss,
    "fsp": FSPLoss,
    "hint": HintLoss,
}

LOGIT_LOSSES: dict[str, type[nn.Module]] = {
    "kd": KDLoss,
    "kd_ce": KDCELoss,
    "logit_mse": LogitMSELoss,
    "soft_ce_mse": SoftCEMSELoss,
    "sym_kl": SymKLLoss,
}


def _check_options(kind: str, name: str, cls: type, options: dict, skip=("self", "student_shape", "teacher_shape")) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # e.g. NST passes extra options to its kernel, which checks them
    known = [p for p in params if p not in skip]
    for key in options:
        if key not in known:
            raise unknown_name_error(f"{kind} {name!r} option", key, known)


def build_feature_loss(name: str, student_shape: Shape, teacher_shape: Shape, **options) -> nn.Module:
    """A feature-loss module by name (nst, at, gram, fsp, hint), checked against the feature shapes.

    Shapes are full tensor shapes from a dry run (batch included), or pairs of them for ``fsp``.
    Raises ValueError for an unknown name or option, or shapes the loss cannot compare.
    """
    if name not in FEATURE_LOSSES:
        raise unknown_name_error("feature loss", name, sorted(FEATURE_LOSSES))
    cls = FEATURE_LOSSES[name]
    _check_options("feature loss", name, cls, options)
    if cls is HintLoss:
        return HintLoss(student_shape, teacher_shape, **options)
    module = cls(**options)
    module.check_shapes(student_shape, teacher_shape)
    return module


def build_logit_loss(name: str, **options) -> nn.Module:
    """A logit-loss module by name (kd, kd_ce, logit_mse, soft_ce_mse, sym_kl)."""
    if name not in LOGIT_LOSSES:
        raise unknown_name_error("logit loss", name, sorted(LOGIT_LOSSES))
    cls = LOGIT_LOSSES[name]
    _check_options("logit loss", name, cls, options)
    return cls(**options)
