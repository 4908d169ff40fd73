"""What :func:`featkd.engine.fit` trains: the :class:`Method` protocol, the :class:`MethodBase` every featkd
Method builds on, and the two plain ones, :class:`SupervisedMethod` and :class:`DistillMethod`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from featkd.batches import IMAGES, BatchFormat, call_model
from featkd.checkpoint import load_weights
from featkd.engine.precision import Precision
from featkd.functional import cross_entropy
from featkd.layer_specs import unwrap
from featkd.model_outputs import logits_of, token_rows
from featkd.models import check_input


@runtime_checkable
class Method(Protocol):
    """What :func:`~featkd.engine.fit` needs from a training method (see :class:`MethodBase`)."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int,
                   indices: torch.Tensor | None = None) -> dict[str, float]:
        """Forward, backward and optimiser step(s) on one batch; return the named losses as floats.

        ``indices``: the samples' dataset indices when the training loader yields ``(x, y, indices)``, else
        None; a Method with per-sample state (e.g. :class:`DistillMethod` for a loss with a memory bank)
        uses them, the others ignore them.
        """

    def eval_models(self) -> dict[str, nn.Module]:
        """The models to evaluate (and save) after every epoch, by name."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each epoch's last step (lr schedules)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MethodBase(ABC):
    """A Method's shared parts: its optimiser, the schedulers stepped after each epoch, mixed precision,
    and its state saved and restored by name.

    A subclass implements :meth:`train_step`, :meth:`eval_models` and :meth:`state_parts`, which names
    what a checkpoint holds: modules (saved unwrapped from DDP/compile), optimisers, schedulers,
    :class:`Precision`, anything else with ``state_dict``/``load_state_dict``, ``None`` (nothing to
    save), or lists and dicts of those. ``optimizer`` is the one whose learning rate ``fit`` logs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, schedulers: Sequence = (),
                 precision: Precision | None = None):
        self.optimizer = optimizer
        self.schedulers = [s for s in schedulers if s is not None]
        self.precision = precision or Precision()

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int,
                   indices: torch.Tensor | None = None) -> dict[str, float]:
        """Forward, backward and optimiser step(s) on one batch; return the named losses as floats."""

    @abstractmethod
    def eval_models(self) -> dict[str, nn.Module]:
        """The models to evaluate (and save) after every epoch, by name."""

    @abstractmethod
    def state_parts(self) -> dict[str, Any]:
        """What a checkpoint holds, by name (see the class docstring)."""

    def on_epoch_end(self, epoch: int) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict:
        return {key: _state_of(part) for key, part in self.state_parts().items()}

    def load_state_dict(self, state: Mapping) -> None:
        for key, part in self.state_parts().items():
            _load_state(part, state[key], key)


def _state_of(part: Any) -> Any:
    if part is None:
        return None
    if isinstance(part, (list, tuple)):
        return [_state_of(p) for p in part]
    if isinstance(part, Mapping):
        return {key: _state_of(p) for key, p in part.items()}
    return (unwrap(part) if isinstance(part, nn.Module) else part).state_dict()


def _load_state(part: Any, state: Any, key: str) -> None:
    if part is None:
        return
    if isinstance(part, (list, tuple)):
        if len(state) != len(part):
            raise ValueError(f"the checkpoint holds {len(state)} {key} but this run has {len(part)}.")
        for p, s in zip(part, state):
            _load_state(p, s, key)
    elif isinstance(part, Mapping):
        missing = [name for name in part if name not in state]
        if missing:
            raise KeyError(f"the checkpoint has no state for {key} {missing}; it holds {sorted(state)}")
        for name, p in part.items():
            _load_state(p, state[name], f"{key}.{name}")
    elif isinstance(part, nn.Module):
        load_weights(unwrap(part), state, f"the {key} in its checkpoint is of another architecture than this run's")
    else:
        part.load_state_dict(state)


def losses_to_floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The named loss tensors as floats, with one device sync for all terms instead of one per term."""
    values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
    return dict(zip(losses.keys(), values))


class SupervisedMethod(MethodBase):
    """Cross-entropy training of one model (teachers, and students without distillation), per sample or per
    valid token; ``batch_format`` says how the model is called on a batch (:class:`featkd.BatchFormat`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 precision: Precision | None = None, grad_clip: float | None = None, name: str = "model",
                 batch_format: BatchFormat = IMAGES):
        super().__init__(optimizer, [scheduler], precision)
        self.model, self.scheduler = model, scheduler
        self.grad_clip, self.name, self.batch_format = grad_clip, name, batch_format
        self._outputs = self._own_outputs  # model input -> model output

    def train_step(self, x, y, step, indices=None):
        loss, losses = self.step_losses(x, y, step, indices)
        self.precision.backward_step(loss, self.optimizer, self.grad_clip)
        return losses_to_floats(losses)

    def step_losses(self, x, y, step, indices=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward of :meth:`train_step`: the loss to train on and the named losses it logs."""
        self.model.train()
        with self.precision.autocast():
            model_input = self.batch_format.model_input(x)
            check_input(self.model, model_input)
            logits = logits_of(self._outputs(model_input))
            # labelled samples (or tokens) only: y = -1 skipped
            loss = cross_entropy(*token_rows(logits, self.batch_format.mask_of(x), y))
        return loss, {"ce": loss}

    def _own_outputs(self, model_input):
        return call_model(self.model, model_input)

    def share_model(self, outputs) -> None:
        """Take the model's output from ``outputs(model_input)`` instead of running it (:mod:`featkd.fused`)."""
        self._outputs = outputs

    def eval_models(self):
        return {self.name: self.model}

    def state_parts(self):
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "precision": self.precision}


class DistillMethod(MethodBase):
    """Train a :class:`featkd.Distiller`'s student (and its adapters) on the distiller's total loss.

    ``forward`` is what is called for the training forward: the distiller itself,
    or the distiller wrapped in DistributedDataParallel (``featkd.distributed.wrap``)
    so that adapter and loss parameters are synchronised along with the student's.
    ``steps_per_epoch`` turns the global step into a fractional epoch for
    epoch-based loss-weight schedules.
    """

    def __init__(self, distiller, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 precision: Precision | None = None, grad_clip: float | None = None,
                 steps_per_epoch: int | None = None, forward: nn.Module | None = None):
        if not getattr(distiller, "is_setup", True):
            from featkd.distiller import NOT_SET_UP  # only on this error: `featkd train` never loads the losses

            raise RuntimeError(NOT_SET_UP)
        super().__init__(optimizer, [scheduler], precision)
        self.distiller, self.scheduler = distiller, scheduler
        self.grad_clip, self.steps_per_epoch = grad_clip, steps_per_epoch
        self.forward = forward if forward is not None else distiller

    def train_step(self, x, y, step, indices=None):
        loss, losses = self.step_losses(x, y, step, indices)
        self.precision.backward_step(loss, self.optimizer, self.grad_clip)
        return losses_to_floats(losses)

    def step_losses(self, x, y, step, indices=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward of :meth:`train_step`: the loss to train on and the named losses it logs."""
        self.distiller.train()
        epoch = step / self.steps_per_epoch if self.steps_per_epoch else None
        with self.precision.autocast():
            _, losses = self.forward(x, y, step=step, epoch=epoch, indices=indices)
        return losses["total"], losses

    def share_model(self, outputs) -> None:
        """Take the student's ``(output, features)`` from ``outputs(student_input)`` (:mod:`featkd.fused`)."""
        self.distiller.share_student(outputs)

    def eval_models(self):
        return {"student": self.distiller.student}

    def state_parts(self):
        return {"distiller": self.distiller, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "precision": self.precision}
