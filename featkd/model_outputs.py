"""What a model returned, read in one place: its logits (:func:`logits_of`), its own loss, and the student's
task loss (:class:`TaskLoss`): cross-entropy on labels, the model's own returned loss (a Hugging Face
``outputs.loss``, a detector's dict of losses, summed or weighted), or a callable.

Logits of shape (B, L, V) are per token (a language model, token classification): the logit losses and
the cross-entropy then run over the valid tokens (:func:`token_rows`) — the batch's token mask and, for the
cross-entropy, labels ≥ 0 (Hugging Face's ``-100`` and featkd's ``-1`` mark a position without a label) —
averaged over those tokens, as Hugging Face averages its own token losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from featkd.functional import cross_entropy
from featkd.functional.logits import UNLABELED

__all__ = ["TASK_LOSSES", "TaskLoss", "logits_of", "model_loss", "token_rows"]


def _is_loss_dict(output: Any) -> bool:
    """A detector's training output: a dict of scalar losses and nothing else."""
    return (isinstance(output, Mapping) and bool(output) and "logits" not in output
            and all(isinstance(v, Tensor) and v.dim() == 0 for v in output.values()))


def logits_of(output: Any) -> Tensor | None:
    """The logits in a model's output: the tensor itself, a ``logits`` key or attribute (a ``ModelOutput``,
    torchvision's ``InceptionOutputs``), or a plain tuple's first element; None for a detector's dict of
    losses (it has no logits to distil)."""
    if isinstance(output, Tensor):
        return output
    if _is_loss_dict(output):
        return None
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}: a model returns a "
                    "tensor, something with a 'logits' key or attribute, or a tuple whose first element is the logits")


def model_loss(output: Any, weights: Mapping[str, float] | None = None) -> Tensor:
    """The loss a model returned: ``output.loss`` / ``output["loss"]``, or a dict of losses summed (each
    times its weight in ``weights``, which must name every loss the model returned)."""
    if _is_loss_dict(output):
        if weights is None:
            return sum(output.values())
        missing = sorted(set(output) - set(weights))
        unknown = sorted(set(weights) - set(output))
        if missing or unknown:
            raise KeyError(f"task_loss weights {sorted(weights)} do not match the model's losses {sorted(output)}: "
                           f"give one weight per loss the model returns")
        return sum(weights[key] * value for key, value in output.items())
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"task_loss='model' but the model returned no loss ({type(output).__name__} without 'loss'): "
                         "pass the labels to the student (BatchFormat(inputs=(..., 'labels'))) or use task_loss='ce'")
    return loss


def token_rows(logits: Tensor, mask: Tensor | None, targets: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
    """(B, L, V) logits as (n, V) rows, one per valid token of ``mask`` (every token without one), with the
    (n,) targets of those tokens (negative ones as featkd's unlabelled ``-1``); (B, V) logits as they are."""
    if logits.dim() == 2:
        return logits, targets
    if logits.dim() != 3:
        raise ValueError(f"logits are (B, classes) or per token (B, L, vocabulary), got shape {tuple(logits.shape)}")
    valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device) if mask is None else mask != 0
    if tuple(valid.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"token mask of shape {tuple(valid.shape)} for logits of shape {tuple(logits.shape)}: the "
                         "mask is (B, L), one entry per token")
    rows = logits[valid]
    if targets is None:
        return rows, None
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"token targets of shape {tuple(targets.shape)} for logits of shape {tuple(logits.shape)}: "
                         "per-token labels are (B, L)")
    picked = targets[valid]
    return rows, torch.where(picked < 0, torch.full_like(picked, UNLABELED), picked)


TASK_LOSSES = ("ce", "model")


class TaskLoss:
    """The student's own objective, weighted by the Distiller's ``ce_weight``.

    ``"ce"`` (default): cross-entropy on the targets, per sample or per valid token (module docstring);
    none without targets. ``"model"``: the loss the student returned (``outputs.loss``; a dict of losses
    summed). ``{name: weight}``: the student's dict of losses weighted (a detector's ``loss_classifier``,
    ``loss_box_reg``, ...). A callable ``(student_output, targets, batch) -> Tensor``: anything else.
    """

    def __init__(self, spec: str | Mapping[str, float] | Callable = "ce"):
        if isinstance(spec, str) and spec not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {list(TASK_LOSSES)}, a dict of weights for the model's losses "
                             f"or a callable (output, targets, batch) -> loss; got {spec!r}")
        if not isinstance(spec, (str, Mapping)) and not callable(spec):
            raise TypeError(f"task_loss must be 'ce', 'model', a dict of weights or a callable, got {spec!r}")
        self.spec = spec

    @property
    def needs_targets(self) -> bool:
        return self.spec == "ce"

    def __call__(self, output: Any, logits: Tensor | None, targets: Tensor | None, batch: Any,
                 mask: Tensor | None) -> Tensor | None:
        if self.spec == "ce":
            if targets is None:
                return None
            if logits is None:
                raise ValueError("task_loss='ce' needs logits, but the student returned a dict of losses: give "
                                 "task_loss='model'")
            return cross_entropy(*token_rows(logits, mask, targets))
        if self.spec == "model":
            return model_loss(output)
        if isinstance(self.spec, Mapping):
            return model_loss(output, self.spec)
        return self.spec(output, targets, batch)

    def __repr__(self) -> str:
        return f"TaskLoss({self.spec!r})"
