"""Logit losses: Hinton's KD and its relatives (see :mod:`featkd.functional.logits`)."""

from __future__ import annotations

from torch import nn

from featkd import functional as KF
from featkd.functional.logits import check_temperature
from featkd.losses.registry import register_logit_loss


@register_logit_loss("kd")
class KDLoss(nn.Module):
    """Hinton's KD term alone (see :func:`featkd.functional.kd_loss`)."""

    def __init__(self, T: float = 4.0):
        super().__init__()
        check_temperature(T)
        self.T = T

    def forward(self, student_logits, teacher_logits, targets=None):
        return KF.kd_loss(student_logits, teacher_logits, self.T)


@register_logit_loss("kd_ce")
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


@register_logit_loss("logit_mse")
class LogitMSELoss(nn.Module):
    """Logit matching (see :func:`featkd.functional.logit_mse_loss`)."""

    def forward(self, student_logits, teacher_logits, targets=None):
        return KF.logit_mse_loss(student_logits, teacher_logits)


@register_logit_loss("soft_ce_mse")
class SoftCEMSELoss(nn.Module):
    """Soft cross-entropy / logit-MSE interpolation (see :func:`featkd.functional.soft_ce_mse_loss`)."""

    def __init__(self, T: float = 4.0, lam: float = 0.5):
        super().__init__()
        check_temperature(T)
        self.T, self.lam = T, lam

    def forward(self, student_logits, teacher_logits, targets=None):
        return KF.soft_ce_mse_loss(student_logits, teacher_logits, self.T, self.lam)


@register_logit_loss("sym_kl")
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
