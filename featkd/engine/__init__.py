"""Training: one loop, :func:`fit`, for every way of training, and the :class:`Method` it trains.

A Method knows how to take one optimisation step on a batch and which models to evaluate; ``fit``
owns everything around the steps (epochs, evaluation, checkpoints, resuming, the NaN guard, DDP
bookkeeping, logging). Teacher training (:class:`SupervisedMethod`), feature distillation
(:class:`DistillMethod`), the sweep (``featkd.sweep``) and the strategies (``featkd.strategies``:
DML, Born-Again, adversarial KD) are all Methods built on :class:`MethodBase`.

Writing a new Method (``featkd/engine/method.py`` holds the protocol, the base and these two)::

    class MyMethod(MethodBase):
        def __init__(self, model, optimizer, scheduler=None, precision=None):
            super().__init__(optimizer, [scheduler], precision)      # None schedulers are left out
            self.model = model
        def train_step(self, x, y, step, indices=None):
            self.model.train()
            with self.precision.autocast():
                loss = F.cross_entropy(self.model(x), y)
            self.precision.backward_step(loss, self.optimizer)
            return {"total": loss.item()}
        def eval_models(self):
            return {"model": self.model}
        def state_parts(self):                      # what a checkpoint holds, by name
            return {"model": self.model, "optimizer": self.optimizer, "schedulers": self.schedulers,
                    "precision": self.precision}

The base steps the schedulers after each epoch and saves and restores the parts; ``fit`` logs the
learning rate of ``optimizer``'s first parameter group.
"""

from featkd.engine.loop import (DivergenceError, evaluate, fit, resolve_device, seed_everything,
                               use_deterministic_kernels)
from featkd.engine.method import DistillMethod, Method, MethodBase, SupervisedMethod, losses_to_floats
from featkd.engine.optim import LRFactor, build_optimizer, build_scheduler, decay_milestones
from featkd.engine.precision import Precision

__all__ = [
    "DistillMethod",
    "DivergenceError",
    "LRFactor",
    "Method",
    "MethodBase",
    "Precision",
    "SupervisedMethod",
    "build_optimizer",
    "build_scheduler",
    "decay_milestones",
    "evaluate",
    "fit",
    "losses_to_floats",
    "resolve_device",
    "seed_everything",
    "use_deterministic_kernels",
]
