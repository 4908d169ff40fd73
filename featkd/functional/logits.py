"""Logit distillation terms. All return a batch mean; weights are the caller's.

``targets == -1`` marks an unlabeled sample: the cross-entropy ignores it (``ignore_index=-1``)
and averages over the labelled samples only (0 when none is labelled).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .shapes import full_precision

# The label of an unlabelled example: written by featkd.data's transfer-set edits, skipped by the cross-entropy.
UNLABELED = -1


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, T: float | None = None) -> None:
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"logit losses need two (B, num_classes) tensors of one shape, got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        raise ValueError("logit loss of an empty batch (B = 0): nothing to average")
    if T is not None:
        check_temperature(T)


def check_temperature(T) -> None:
    """A softmax temperature must be a number > 0 (T <= 0 flips or divides by zero)."""
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T!r}")


@full_precision
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0) -> Tensor:
    """Hinton et al. 2015: T^2 · KL(softmax(t/T) || softmax(s/T)), batch mean.

    The T^2 factor keeps the gradient scale independent of T.
    """
    _check_logits(student_logits, teacher_logits, T)
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


@full_precision
def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy averaged over labelled samples (targets == -1 ignored; 0 when none is labelled)."""
    if targets.device.type == "cpu" and len(targets):  # on an accelerator the check would cost a sync per step
        low, high = int(targets.min()), int(targets.max())
        if low < UNLABELED or high >= logits.shape[1]:
            raise ValueError(f"labels must be class indices 0..{logits.shape[1] - 1} for the model's "
                             f"{logits.shape[1]} outputs (or {UNLABELED} for unlabelled), got "
                             f"{low if low < UNLABELED else high}: build the model with num_classes covering the "
                             "data's labels")
    labelled = (targets != UNLABELED).sum().clamp_min(1)
    return F.cross_entropy(logits, targets, ignore_index=UNLABELED, reduction="sum") / labelled


def kd_ce_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    T: float = 4.0,
    alpha: float = 0.9,
    beta: float = 0.1,
) -> Tensor:
    """Hard + soft targets as the weighted average (alpha · KD + beta · CE) / (alpha + beta).

    KD is :func:`kd_loss` at temperature T; CE is on the raw logits with unlabeled samples
    (-1) ignored. RepDistiller's KD setting is alpha=0.9, beta=0.1, T=4.
    """
    if alpha < 0 or beta < 0 or alpha + beta <= 0:
        raise ValueError(f"kd_ce_loss needs alpha, beta >= 0 with alpha + beta > 0, got alpha={alpha}, beta={beta}")
    kd = kd_loss(student_logits, teacher_logits, T)
    ce = cross_entropy(student_logits, targets)
    return (alpha * kd + beta * ce) / (alpha + beta)


@full_precision
def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Logit matching (Ba & Caruana 2014): mean over batch and classes of (s - t)^2."""
    _check_logits(student_logits, teacher_logits)
    return F.mse_loss(student_logits, teacher_logits)


@full_precision
def soft_ce_mse_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0, lam: float = 0.5) -> Tensor:
    """Interpolation between soft cross-entropy and logit MSE:

        (1 - lam) · T^2 · H(softmax(t/T), softmax(s/T)) + lam · mean((s - t)^2)

    with H(p, q) = -sum_k p_k log q_k, batch mean. lam=0 is the soft-target cross-entropy (KD up to
    the teacher's entropy, which carries no gradient), lam=1 is :func:`logit_mse_loss`; Tang et al.
    2020 ("Understanding and improving knowledge distillation") compare these two ends. This convex
    combination is our own formulation of the family; its end points are exact.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"soft_ce_mse_loss needs 0 <= lam <= 1, got lam={lam}")
    _check_logits(student_logits, teacher_logits, T)
    p_t = F.softmax(teacher_logits / T, dim=1)
    soft_ce = -(p_t * F.log_softmax(student_logits / T, dim=1)).sum(1).mean() * (T * T)
    return (1.0 - lam) * soft_ce + lam * F.mse_loss(student_logits, teacher_logits)


@full_precision
def sym_kl_loss(logits_a: Tensor, logits_b: Tensor, T: float = 1.0) -> Tensor:
    """Symmetric KL: T^2 · (KL(p_a || p_b) + KL(p_b || p_a)), batch mean; gradients reach both sides."""
    _check_logits(logits_a, logits_b, T)
    log_a = F.log_softmax(logits_a / T, dim=1)
    log_b = F.log_softmax(logits_b / T, dim=1)
    kl_ab = F.kl_div(log_b, log_a, reduction="batchmean", log_target=True)
    kl_ba = F.kl_div(log_a, log_b, reduction="batchmean", log_target=True)
    return (kl_ab + kl_ba) * (T * T)


def dml_kl_loss(self_logits: Tensor, other_logits: Tensor, T: float = 1.0) -> Tensor:
    """Deep Mutual Learning's one-directional term KL(p_other || p_self), the other peer detached."""
    return kd_loss(self_logits, other_logits.detach(), T)
