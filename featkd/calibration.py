"""Loss weights given relative to the cross-entropy, resolved on one batch before training.

A published weight is tuned for one pair of models, one dataset and one schedule: AT's β = 1e3 per
group puts about 30× the cross-entropy's gradient on a WRN-16-1 student at initialisation on
Fashion-MNIST, NST's 50 about 13×. :class:`RelativeToCE` states a weight as that ratio instead:
``RelativeToCE(1.0)`` makes the term's gradient on the student's parameters as large as the (unweighted)
cross-entropy's, on the calibration batch, with the student as it is before its first step.
:func:`calibrate_weights` measures both gradients and replaces every such weight by the absolute
number it resolves to, which the run records (``config.yaml`` keeps ``relative_to_ce`` and
``resolved``), so a resumed or repeated run uses the same number.

The ratio holds at initialisation only: a term that shrinks faster than the cross-entropy as training
goes on ends up weaker than the ratio says, one that shrinks slower stronger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


__all__ = ["RelativeToCE", "calibrate_weights", "gradient_ratios"]


@dataclass(frozen=True)
class RelativeToCE:
    """A term weight that makes the term's gradient norm on the student ``ratio`` times the cross-entropy's
    (measured once, on the calibration batch, by :func:`calibrate_weights`)."""

    ratio: float

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"relative_to_ce must be a positive number, got {self.ratio!r}")


def _gradient_norm(value: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None))


def gradient_ratios(distiller, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{loss name: ‖∇ unweighted loss‖ / ‖∇ cross-entropy‖}`` over the student's parameters, for every term
    (and ``kd``) of a set-up ``distiller`` on the batch ``(x, y)``, in training mode.

    Nothing the batch touches is kept: the student's (and adapters') buffers — batch-norm running
    statistics — and the random-number state are restored, so a run calibrated this way continues
    exactly as an uncalibrated one would.
    """
    if not distiller.is_setup:
        raise RuntimeError("call distiller.setup(example_x) before calibrating its weights")
    if distiller.task_key == "ce" and (y is None or not bool((y >= 0).any())):
        raise ValueError("calibrating weights relative to the cross-entropy needs a batch with labels")
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    # the frozen teacher is not touched (eval mode or batch statistics without updates): no copy of it
    saved = {key: value.clone() for key, value in distiller.state_dict().items() if not key.startswith("teacher.")}
    was_training = distiller.training
    try:
        device = params[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            distiller.train()
            _, values = distiller.unweighted_losses(x, y)
            task = values.pop(distiller.task_key, None)
            if task is None:
                raise ValueError("calibrating weights relative to the task loss needs a batch it is defined on")
            ce = _gradient_norm(task, params)
            if ce == 0:
                raise ValueError("the cross-entropy has no gradient on the student at calibration: a weight "
                                 "relative to it is undefined; give absolute weights")
            return {key: _gradient_norm(value, params) / ce for key, value in values.items()}
    finally:
        distiller.load_state_dict(saved, strict=False)
        distiller.train(was_training)


def calibrate_weights(distiller, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Replace every :class:`RelativeToCE` weight of ``distiller`` (terms and ``kd``) by the absolute weight it
    resolves to on the batch ``(x, y)``; return ``{loss name: absolute weight}`` for those it resolved.

    Call it after :meth:`~featkd.Distiller.setup` and before the first training step. A term whose
    gradient on the student is zero at calibration cannot be scaled to a ratio and is refused.
    """
    relative = {key: weight.ratio for key, weight in distiller.loss_weights().items()
                if isinstance(weight, RelativeToCE)}
    if not relative:
        return {}
    ratios = gradient_ratios(distiller, x, y)
    resolved = {}
    for key, ratio in relative.items():
        if ratios[key] == 0:
            raise ValueError(f"loss {key!r} has no gradient on the student at calibration (its layers do not reach "
                             "the student's parameters?): give it an absolute weight instead of relative_to_ce")
        resolved[key] = ratio / ratios[key]
    distiller.set_loss_weights(resolved)
    return resolved
