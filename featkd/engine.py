"""The training loop.

One loop, :func:`fit`, trains any :class:`Method` — an object that knows how to
take one optimisation step on a batch and which models to evaluate. Teacher
training (:class:`SupervisedMethod`), feature distillation
(:class:`DistillMethod`) and the strategies in ``featkd.strategies`` (DML,
Born-Again, adversarial KD) are all Methods; ``fit`` owns everything around the
steps: epochs, evaluation, metrics files, checkpoints, resuming, the NaN guard
and DDP bookkeeping.

Writing a new Method::

    class MyMethod:
        def __init__(self, model, optimizer, scheduler, precision=None):
            self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
            self.precision = precision or Precision()
        def train_step(self, x, y, step):
            self.model.train()
            with self.precision.autocast():
                loss = F.cross_entropy(self.model(x), y)
            self.precision.backward_step(loss, self.optimizer)
            return {"total": loss.item()}
        def eval_models(self):
            return {"model": self.model}
        def on_epoch_end(self, epoch):
            self.scheduler.step()
        def state_dict(self):
            return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "precision": self.precision.state_dict()}
        def load_state_dict(self, state): ...

If the Method has an ``optimizer`` attribute, the learning rate of its first
parameter group is logged each epoch.
"""

from __future__ import annotations

import bisect
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featkd import checkpoint as ckpt
from featkd import distributed
from featkd.functional import cross_entropy
from featkd.hooks import unwrap

__all__ = [
    "Method",
    "SupervisedMethod",
    "DistillMethod",
    "Precision",
    "DivergenceError",
    "fit",
    "evaluate",
    "build_optimizer",
    "build_scheduler",
    "decay_milestones",
    "seed_everything",
    "resolve_device",
]


# --------------------------------------------------------------------------- seeding and devices


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    ``deterministic=True`` also asks torch for deterministic kernels (slower on GPU;
    CPU kernels used here are deterministic already).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` is the local CUDA device when there is one (per ``LOCAL_RANK`` under torchrun), else the CPU."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but CUDA is not available here; use device=cpu or auto.")
    return device


# --------------------------------------------------------------------------- mixed precision


class Precision:
    """Autocast and (for fp16) gradient scaling, shared by every Method.

    ``amp`` is ``None`` (full precision), ``"bf16"`` or ``"fp16"``. On the CPU
    fp16 autocast is a no-op (CPU kernels gain nothing from it) while bf16 is
    honoured, since it was asked for explicitly.
    """

    def __init__(self, amp: str | None = None, device: str | torch.device = "cpu"):
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be one of None, 'bf16', 'fp16'; got {amp!r}")
        self.amp = amp
        self.device_type = torch.device(device).type
        self.enabled = amp == "bf16" or (amp == "fp16" and self.device_type == "cuda")
        self.dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16" and self.device_type == "cuda")

    def autocast(self):
        """Context manager for the forward pass (and the loss computation)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = None,
    ) -> None:
        """``zero_grad``, backward (scaled under fp16), optional grad-norm clipping, optimiser step."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# --------------------------------------------------------------------------- optimisers and schedules


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW; the defaults are the AT/NST papers' CIFAR setting."""
    params = list(params)
    if not params:
        raise ValueError("build_optimizer got no parameters to optimise")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of 'sgd', 'adam', 'adamw'")


class LRFactor:
    """The learning-rate multiplier as a pure function of the (0-based) epoch index.

    * ``multistep``: ``gamma ** (number of milestones <= epoch)``: milestone m decays the rate after
      m epochs. The AT/NST papers' 60/120/160 read that way give stages of 60/60/40/40 epochs; the
      official AT code decays at the start of 1-indexed epochs 60/120/160, i.e. milestones
      [59, 119, 159] (:func:`decay_milestones`);
    * ``cosine``: half a cosine from 1 to ``min_factor`` over ``epochs``;
    * ``constant``: 1.

    An optional linear warm-up ramps the factor over the first ``warmup_epochs``.
    """

    def __init__(self, name: str, epochs: int, milestones=(), gamma: float = 0.1,
                 warmup_epochs: int = 0, min_factor: float = 0.0):
        if name not in ("multistep", "cosine", "constant"):
            raise ValueError(f"unknown schedule {name!r}; choose one of 'multistep', 'cosine', 'constant'")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"schedule milestones must be increasing, got {list(milestones)}")
        self.name, self.epochs, self.milestones, self.gamma = name, epochs, list(milestones), gamma
        self.warmup_epochs, self.min_factor = warmup_epochs, min_factor

    def __call__(self, epoch: int) -> float:
        if self.name == "multistep":
            factor = self.gamma ** bisect.bisect_right(self.milestones, epoch)
        elif self.name == "cosine":
            progress = min(epoch / max(self.epochs, 1), 1.0)
            factor = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = 1.0
        if epoch < self.warmup_epochs:
            factor *= (epoch + 1) / self.warmup_epochs
        return factor


def decay_milestones(epochs: int, fractions: Iterable[float]) -> list[int]:
    """:class:`LRFactor` milestones that decay the rate at the start of the 1-indexed epoch
    ``round(f * epochs)`` for each fraction ``f``: the official AT code's convention, in which
    (0.3, 0.6, 0.8) of 200 epochs give [59, 119, 159], stages of 59/60/40/41 epochs.

    For short runs each decay comes at least one epoch after the previous one (the first not before
    the second epoch), and decays that would not happen within ``epochs`` are left out: two decays
    never fall on the same epoch.
    """
    fractions = list(fractions)
    if fractions != sorted(fractions) or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"decay fractions must be increasing and in (0, 1], got {fractions}")
    milestones: list[int] = []
    for f in fractions:
        milestone = max(round(f * epochs) - 1, milestones[-1] + 1 if milestones else 1)
        if milestone >= epochs:
            break
        milestones.append(milestone)
    return milestones


class EpochSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A per-epoch :class:`LRFactor` schedule that can also restart the optimiser at its milestones.

    With ``restart_momentum_at_milestones`` the optimiser's per-parameter state (SGD's momentum
    buffers) is cleared whenever the epoch reaches a milestone, before any step at the decayed rate:
    exactly what building a new optimiser at each decay does, as the official AT code does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: LRFactor,
                 restart_momentum_at_milestones: bool = False):
        if restart_momentum_at_milestones and factor.name != "multistep":
            raise ValueError(f"restart_momentum_at_milestones needs the 'multistep' schedule (its milestones are "
                             f"the restarts), got {factor.name!r}")
        self.restart_momentum_at_milestones = restart_momentum_at_milestones
        super().__init__(optimizer, factor)

    def step(self) -> None:
        super().step()
        if self.restart_momentum_at_milestones and self.last_epoch in self.lr_lambdas[0].milestones:
            self.optimizer.state.clear()


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "multistep",
    epochs: int = 200,
    milestones: Iterable[int] = (60, 120, 160),
    gamma: float = 0.2,
    warmup_epochs: int = 0,
    min_factor: float = 0.0,
    restart_momentum_at_milestones: bool = False,
) -> EpochSchedule:
    """A per-epoch learning-rate schedule (call ``.step()`` once at the end of each epoch); see
    :class:`LRFactor` and, for ``restart_momentum_at_milestones``, :class:`EpochSchedule`."""
    factor = LRFactor(name, epochs, tuple(milestones), gamma, warmup_epochs, min_factor)
    return EpochSchedule(optimizer, factor, restart_momentum_at_milestones)


# --------------------------------------------------------------------------- methods


@runtime_checkable
class Method(Protocol):
    """What :func:`fit` needs from a training method (see the module docstring for an example)."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, float]:
        """Forward, backward and optimiser step(s) on one batch; return the named losses as floats."""

    def eval_models(self) -> dict[str, nn.Module]:
        """The models to evaluate (and save) after every epoch, by name."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each epoch's last step (lr schedules)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _losses_to_floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    # One device sync for all terms instead of one .item() per term.
    values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
    return dict(zip(losses.keys(), values))


class SupervisedMethod:
    """Cross-entropy training of one model (teachers, and students without distillation)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 precision: Precision | None = None, grad_clip: float | None = None, name: str = "model"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision = precision or Precision()
        self.grad_clip, self.name = grad_clip, name

    def train_step(self, x, y, step):
        self.model.train()
        with self.precision.autocast():
            loss = cross_entropy(self.model(x), y)  # labelled samples only (y = -1 skipped)
        self.precision.backward_step(loss, self.optimizer, self.grad_clip)
        return {"ce": loss.item()}

    def eval_models(self):
        return {self.name: self.model}

    def on_epoch_end(self, epoch):
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self):
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, state):
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])


class DistillMethod:
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
            raise RuntimeError(
                "the Distiller has not been set up: call distiller.setup(example_x) before building the optimizer, "
                "so that adapters and loss parameters exist and are optimised."
            )
        self.distiller, self.optimizer, self.scheduler = distiller, optimizer, scheduler
        self.precision = precision or Precision()
        self.grad_clip, self.steps_per_epoch = grad_clip, steps_per_epoch
        self.forward = forward if forward is not None else distiller

    def train_step(self, x, y, step):
        self.distiller.train()
        epoch = step / self.steps_per_epoch if self.steps_per_epoch else None
        with self.precision.autocast():
            _, losses = self.forward(x, y, step=step, epoch=epoch)
        self.precision.backward_step(losses["total"], self.optimizer, self.grad_clip)
        return _losses_to_floats(losses)

    def eval_models(self):
        return {"student": self.distiller.student}

    def on_epoch_end(self, epoch):
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self):
        return {
            "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, state):
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device | str | None = None,
             precision: Precision | None = None, channels_last: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy in percent/nats (and top-5 when there are more than 5 classes).

    Under DDP every rank evaluates its own shard and the counts are summed, so the
    numbers are those of the whole split. Samples with target ``-1`` are skipped.
    """
    model = unwrap(model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = model.training
    model.eval()
    precision = precision or Precision()
    sums: dict[str, float] = defaultdict(float)
    try:
        for x, y in loader:
            x, y = _to_device(x, y, device, channels_last)
            with precision.autocast():
                logits = model(x)
            labeled = y >= 0
            logits, y = logits[labeled].float(), y[labeled]
            sums["loss"] += F.cross_entropy(logits, y, reduction="sum").item()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = ranked == y[:, None]
            sums["correct1"] += hits[:, 0].sum().item()
            sums["correct5"] += hits.any(dim=1).sum().item()
            sums["count"] += y.numel()
            sums["classes"] = max(sums["classes"], logits.shape[1])
    finally:
        model.train(was_training)
    classes = sums.pop("classes", 0)
    sums = distributed.all_reduce_sum(dict(sums) or {"loss": 0.0, "correct1": 0.0, "correct5": 0.0, "count": 0.0})
    count = max(sums["count"], 1)
    result = {"acc1": 100.0 * sums["correct1"] / count, "loss": sums["loss"] / count}
    if classes > 5:
        result["acc5"] = 100.0 * sums["correct5"] / count
    return result


def _to_device(x, y, device, channels_last):
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


# --------------------------------------------------------------------------- the loop


class DivergenceError(RuntimeError):
    """A training loss became NaN or infinite; the last good checkpoint was left as it was."""


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and distributed.is_main_process()


def fit(
    method: Method,
    train_loader,
    test_loader,
    run_dir: str | os.PathLike,
    epochs: int,
    *,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    model_info: dict[str, dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    precision: Precision | None = None,
    best_metric: str | None = None,
    progress: bool | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Train ``method`` for ``epochs`` epochs, evaluating and checkpointing after each; return the metrics history.

    * ``run_dir`` must be new (or empty) unless ``resume=True``, in which case the
      run continues from ``run_dir/last.pt`` and ends exactly where an
      uninterrupted run would (loader order is a function of (seed, epoch) via
      ``train_loader.set_epoch``; RNG states are restored per rank).
    * Each epoch appends a row to ``metrics.jsonl``/``metrics.csv``: every named
      loss averaged over the epoch (``train/<name>``), ``<model>/acc1``,
      ``<model>/acc5`` and ``<model>/loss`` for each eval model, ``lr``,
      ``epoch_time_s`` (training steps) and ``eval_time_s``. ``last.pt`` is
      rewritten every epoch, ``best.pt`` when ``best_metric`` improves (default:
      the first eval model's ``acc1``; a metric named ``...loss`` improves downwards).
    * ``config`` (the resolved config) is saved as ``config.yaml``; ``model_info``
      maps an eval model's name to what is needed to rebuild it (model name,
      num_classes, in_channels) and is stored with its weights in each checkpoint.
    * A NaN/Inf loss raises :class:`DivergenceError` naming the term, step and
      epoch, before anything of that epoch is written.
    * ``precision`` is used for evaluation (default: the Method's own ``precision``).
    """
    rank = distributed.info()
    run_dir = Path(run_dir)
    precision = precision or getattr(method, "precision", None) or Precision()
    progress = _progress_enabled() if progress is None else progress and rank.is_main

    # -- start or resume ---------------------------------------------------------------
    if rank.is_main:
        ckpt.prepare_run_dir(run_dir, resume)
    distributed.barrier()
    history: list[dict[str, Any]] = []
    start_epoch, step, best = 0, 0, None
    if resume:
        state = ckpt.load_checkpoint(run_dir / ckpt.LAST)
        method.load_state_dict(state["method"])
        history, start_epoch, step, best = state["history"], state["epoch"], state["step"], state["best"]
        if len(state["rng"]) != rank.world_size:
            raise ValueError(f"{run_dir / ckpt.LAST} was written by {len(state['rng'])} processes; "
                             f"resume it with the same number, not {rank.world_size}.")
        ckpt.set_rng_state(state["rng"][rank.rank])
        log(f"resuming {run_dir} after epoch {start_epoch} (step {step})")
    if rank.is_main:
        ckpt.write_run_info(run_dir, config)

    # -- epochs ------------------------------------------------------------------------
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        train_loader.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        bar = _progress_bar(train_loader, epoch, epochs, progress)
        for x, y in bar:
            x, y = _to_device(x, y, device, channels_last)
            losses = method.train_step(x, y, step)
            bad = [name for name, value in losses.items() if not math.isfinite(value)]
            if bad:
                culprit = next((name for name in bad if name != "total"), bad[0])
                raise DivergenceError(
                    f"loss {culprit!r} became {losses[culprit]} at step {step} (epoch {epoch + 1}); "
                    f"non-finite terms: {bad}. Training stopped; {run_dir / ckpt.LAST} still holds the last good "
                    "epoch. Lower the learning rate or that term's weight, then resume or restart."
                )
            batch = x.shape[0]
            for name, value in losses.items():
                sums[name] += value * batch
            seen += batch
            step += 1
            if progress:
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
        optimizer = getattr(method, "optimizer", None)
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        method.on_epoch_end(epoch)
        train_time = time.perf_counter() - started

        sums = distributed.all_reduce_sum({**sums, "_seen": seen})
        seen = sums.pop("_seen")
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        row.update({f"train/{name}": total / max(seen, 1) for name, total in sums.items()})
        models = method.eval_models()
        for name, model in models.items():
            scores = evaluate(model, test_loader, device=device, precision=precision, channels_last=channels_last)
            row.update({f"{name}/{key}": value for key, value in scores.items()})
        row["lr"] = lr
        row["epoch_time_s"] = train_time
        row["eval_time_s"] = time.perf_counter() - started - train_time
        history.append(row)

        metric = best_metric or f"{next(iter(models))}/acc1"
        if metric not in row:
            raise KeyError(f"best_metric {metric!r} is not among the epoch metrics {sorted(row)}")
        lower_is_better = metric.endswith("loss")
        improved = best is None or (row[metric] < best["value"] if lower_is_better else row[metric] > best["value"])
        if improved:
            best = {"metric": metric, "value": row[metric], "epoch": epoch + 1}
        rng = distributed.all_gather_object(ckpt.rng_state())
        if rank.is_main:
            state = {
                "epoch": epoch + 1,
                "step": step,
                "method": method.state_dict(),
                "models": {
                    name: {**(model_info or {}).get(name, {}), "state_dict": unwrap(model).state_dict()}
                    for name, model in models.items()
                },
                "rng": rng,
                "history": history,
                "best": best,
                "config": config,
            }
            paths = [run_dir / ckpt.LAST] + ([run_dir / ckpt.BEST] if improved else [])
            ckpt.save_checkpoint(paths, state)
            ckpt.write_metrics(run_dir, history)
            log(_summary(row))
        distributed.barrier()
    return history


def _progress_bar(loader, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def _summary(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key, value in row.items():
        if key not in ("epoch", "step") and isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)
