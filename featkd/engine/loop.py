"""The training loop :func:`fit`, evaluation, seeding and the device.

``fit`` trains any :class:`~featkd.engine.Method` and owns everything around its steps: epochs,
evaluation, checkpoints, resuming, the NaN guard, DDP bookkeeping, and the run's log (the sinks of
:mod:`featkd.engine.sinks`).
"""

from __future__ import annotations

import inspect
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featkd import checkpoint as ckpt
from featkd import distributed
from featkd.batches import IMAGES, BatchFormat, batch_size, to_device
from featkd.config import changed_keys
from featkd.engine.method import Method
from featkd.engine.precision import Precision
from featkd.engine.sinks import run_sinks
from featkd.layer_specs import unwrap
from featkd.model_outputs import logits_of, token_rows

# --------------------------------------------------------------------------- seeding and devices


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    ``deterministic=True`` also asks for deterministic kernels (:func:`use_deterministic_kernels`).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        use_deterministic_kernels()


def use_deterministic_kernels() -> None:
    """Ask torch for deterministic kernels in this process from now on. CUDA's defaults (cuDNN's convolution
    backward, atomic adds) sum in a varying order, so one seed can give other numbers: five one-epoch runs of one
    seed on an H200 scored 35.8-83.7% (benchmarks/results/gpu_h200.md); these kernels cost about 1.2× the epoch
    time there. The CPU kernels used here are deterministic already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


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


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device | str | None = None,
             precision: Precision | None = None, channels_last: bool = False,
             batch_format: BatchFormat = IMAGES) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy in percent/nats (and top-5 when there are more than 5 classes).

    Under DDP every rank evaluates its own shard and the counts are summed, so the
    numbers are those of the whole split. Samples with target ``-1`` are skipped. ``batch_format`` says how
    the model is called on a batch and where its targets are; per-token logits are scored per valid token
    (the format's mask, labels ≥ 0).
    """
    model = unwrap(model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = model.training
    model.eval()
    precision = precision or Precision()
    sums: dict[str, float] = defaultdict(float)
    try:
        for item in loader:
            x, y, _ = batch_format.split(item)
            x, y = to_device(x, device, channels_last), to_device(y, device)
            with precision.autocast():
                logits = logits_of(batch_format.call(model, x))
            logits, y = token_rows(logits, batch_format.mask_of(x), y)
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


# --------------------------------------------------------------------------- the loop


class DivergenceError(RuntimeError):
    """A training loss became NaN or infinite; the last good checkpoint was left as it was."""


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and distributed.is_main_process()


def fit(
    method: Method,
    train_loader,
    test_loader,
    run_dir: str | os.PathLike | None,
    epochs: int,
    *,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    model_info: dict[str, dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    precision: Precision | None = None,
    best_metric: str | None = None,
    eval_every: int = 1,
    progress: bool | None = None,
    batch_format: BatchFormat = IMAGES,
    log=print,
) -> list[dict[str, Any]]:
    """Train ``method`` for ``epochs`` epochs, evaluating and checkpointing after each; return the metrics history.

    * ``run_dir`` must be new (or empty) unless ``resume=True``, in which case the
      run continues from ``run_dir/last.pt`` and ends exactly where an
      uninterrupted run would (loader order is a function of (seed, epoch) via
      ``train_loader.set_epoch``; RNG states are restored per rank). A missing ``best.pt`` is
      restored from ``last.pt`` when both hold the same epoch (otherwise the log says it is gone),
      and the log names the config keys that changed since the run started (``epochs``, ``device``).
      ``run_dir=None`` trains without writing anything (no checkpoints, no logs but ``log``).
    * Each epoch appends a row to the run's log (:func:`featkd.engine.sinks.run_sinks`: ``metrics.jsonl``/
      ``metrics.csv``, TensorBoard when installed, and ``log``): every named
      loss averaged over the epoch (``train/<name>``), ``<model>/acc1``,
      ``<model>/acc5`` and ``<model>/loss`` for each eval model, ``lr``,
      ``epoch_time_s`` (training steps) and ``eval_time_s``. ``last.pt`` is
      rewritten every epoch, ``best.pt`` when ``best_metric`` improves (default:
      the first eval model's ``acc1``; a metric named ``...loss`` improves downwards), before
      ``last.pt``: whatever write fails, ``last.pt`` never holds an epoch whose ``best.pt`` is lost.
      A failed write raises :class:`featkd.checkpoint.WriteFailedError` saying which epoch ``last.pt`` holds.
    * ``config`` (the resolved config) is saved as ``config.yaml``; ``model_info``
      maps an eval model's name to what is needed to rebuild it (model name,
      num_classes, in_channels) and is stored with its weights in each checkpoint.
    * A NaN/Inf loss raises :class:`DivergenceError` naming the term, step and
      epoch, before anything of that epoch is written.
    * ``precision`` is used for evaluation (default: the Method's own ``precision``).
    * A training loader may yield ``(x, y, indices)`` (the samples' dataset indices); they are passed
      on as ``method.train_step(x, y, step, indices)`` (else None) for losses with per-sample state.
    * ``batch_format`` (:class:`featkd.BatchFormat`) reads the batches (dicts too) for training and evaluation.
    * ``eval_every``: evaluate after every that many epochs and always after the last (a sweep of
      dozens of students on a CPU spends more on evaluating than on training otherwise); epochs
      without evaluation have no model metrics and cannot become ``best.pt``.
    """
    _check_arguments(method, epochs, eval_every, run_dir, resume)
    rank = distributed.info()
    run_dir = None if run_dir is None else Path(run_dir)
    precision = precision or getattr(method, "precision", None) or Precision()
    progress = _progress_enabled() if progress is None else progress and rank.is_main
    writes = rank.is_main and run_dir is not None

    history, start_epoch, step, best = _start(method, run_dir, epochs, resume, config, writes, log)
    sinks = run_sinks(run_dir, log, logged_epochs=start_epoch) if writes else []
    try:
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            row, step, lr = _train_epoch(method, train_loader, epoch, epochs, step, run_dir, device, channels_last,
                                         progress, batch_format)
            train_time = time.perf_counter() - started
            models = method.eval_models()
            evaluated = (epoch + 1) % eval_every == 0 or epoch + 1 == epochs
            for name, model in models.items() if evaluated else ():
                scores = evaluate(model, test_loader, device=device, precision=precision, channels_last=channels_last,
                                  batch_format=batch_format)
                row.update({f"{name}/{key}": value for key, value in scores.items()})
            row.update(lr=lr, epoch_time_s=train_time, eval_time_s=time.perf_counter() - started - train_time)
            history.append(row)
            improved, best = _track_best(row, best, best_metric or f"{next(iter(models))}/acc1", evaluated)
            _save_epoch(method, models, history, best, improved, run_dir, config, model_info, writes, sinks)
            distributed.barrier()
    finally:
        for sink in sinks:
            sink.close()
    return history


def _check_arguments(method, epochs, eval_every, run_dir, resume: bool) -> None:
    """Refuse what ``fit`` cannot run before anything starts."""
    for name, value in (("eval_every", eval_every), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if run_dir is None and resume:
        raise ValueError("resume=True needs the run_dir to resume from")
    _check_train_step(method)


def _check_train_step(method) -> None:
    """Every Method's ``train_step`` takes ``(x, y, step, indices)``: say so before training, not at the first batch."""
    try:
        inspect.signature(method.train_step).bind(None, None, 0, None)
    except TypeError:
        raise TypeError(f"{type(method).__name__}.train_step{inspect.signature(method.train_step)} must take the "
                        "samples' indices too: def train_step(self, x, y, step, indices=None)") from None
    except ValueError:  # no signature to read (a builtin or C callable): it is called as it is
        pass


def _start(method, run_dir: Path | None, epochs: int, resume: bool, config, writes: bool, log):
    """Prepare the run directory, or restore the run from its ``last.pt``: ``(history, epoch, step, best)``."""
    rank = distributed.info()
    if writes:
        ckpt.prepare_run_dir(run_dir, resume)
    distributed.barrier()
    if not resume:
        if writes:
            ckpt.write_run_info(run_dir, config)
        return [], 0, 0, None
    state = ckpt.load_checkpoint(run_dir / ckpt.LAST)
    history, start_epoch, step, best = state["history"], state["epoch"], state["step"], state["best"]
    if epochs < start_epoch:
        raise ValueError(f"epochs={epochs} is fewer than the {start_epoch} epochs {run_dir / ckpt.LAST} holds; "
                         f"resume with epochs={start_epoch} or more")
    try:
        method.load_state_dict(state["method"])
    except ValueError as error:
        raise ValueError(f"cannot resume {run_dir}: {error}; its teacher checkpoint, or featkd's models, changed "
                         "since it started: start a new run") from None
    if len(state["rng"]) != rank.world_size:
        raise ValueError(f"{run_dir / ckpt.LAST} was written by {len(state['rng'])} processes; "
                         f"resume it with the same number, not {rank.world_size}.")
    ckpt.set_rng_state(state["rng"][rank.rank])
    changes = changed_keys(state.get("config") or {}, config or {})
    log(f"resuming {run_dir} after epoch {start_epoch} (step {step})" +
        "".join(f"; {key} changed from {old} to {new}" for key, (old, new) in changes.items()))
    restored = ckpt.restore_best(run_dir, state) if rank.is_main else None
    if restored:
        log(restored)
    if writes:
        ckpt.write_run_info(run_dir, config, from_epoch=start_epoch)
        ckpt.write_metrics(run_dir, history)  # a write that failed after last.pt may have left them behind it
    return history, start_epoch, step, best


def _train_epoch(method, train_loader, epoch: int, epochs: int, step: int, run_dir, device, channels_last,
                 progress, batch_format: BatchFormat) -> tuple[dict[str, Any], int, float | None]:
    """One epoch of training steps: the epoch's row (its losses averaged over its samples), the step, the lr."""
    train_loader.set_epoch(epoch)
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    bar = _progress_bar(train_loader, epoch, epochs, progress)
    for item in bar:
        x, y, indices = batch_format.split(item)  # a loader may yield the samples' dataset indices too
        x, y, indices = to_device(x, device, channels_last), to_device(y, device), to_device(indices, device)
        losses = method.train_step(x, y, step, indices)
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        if bad:
            culprit = next((name for name in bad if name != "total"), bad[0])
            raise DivergenceError(
                f"loss {culprit!r} became {losses[culprit]} at step {step} (epoch {epoch + 1}); "
                f"non-finite terms: {bad}. Training stopped; {_what_last_holds(run_dir, epoch)}. Start a new run "
                "with a lower learning rate or a lower weight for that term (a resumed run keeps its settings)."
            )
        size = batch_size(x)
        for name, value in losses.items():
            sums[name] += value * size
        seen += size
        step += 1
        if progress:
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
    optimizer = getattr(method, "optimizer", None)
    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
    method.on_epoch_end(epoch)
    sums = distributed.all_reduce_sum({**sums, "_seen": seen})
    seen = sums.pop("_seen")
    row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
    row.update({f"train/{name}": total / max(seen, 1) for name, total in sums.items()})
    return row, step, lr


def _track_best(row: dict[str, Any], best: dict | None, metric: str, evaluated: bool) -> tuple[bool, dict | None]:
    """Whether this epoch improved ``metric`` (``...loss`` downwards), and the best so far."""
    if evaluated and metric not in row:
        raise KeyError(f"best_metric {metric!r} is not among the epoch metrics {sorted(row)}")
    lower_is_better = metric.endswith("loss")
    improved = evaluated and (
        best is None or (row[metric] < best["value"] if lower_is_better else row[metric] > best["value"]))
    if improved:
        best = {"metric": metric, "value": row[metric], "epoch": row["epoch"]}
    return improved, best


def _save_epoch(method, models, history, best, improved: bool, run_dir, config, model_info, writes: bool,
                sinks) -> None:
    """``best.pt`` (when improved) then ``last.pt``, then the logs; every rank takes part in gathering RNG states."""
    rng = distributed.all_gather_object(ckpt.rng_state())
    if not writes:
        return
    epoch = history[-1]["epoch"]
    state = {
        "epoch": epoch,
        "step": history[-1]["step"],
        "method": method.state_dict(),
        "models": {name: {**(model_info or {}).get(name, {}), "state_dict": unwrap(model).state_dict()}
                   for name, model in models.items()},
        "rng": rng,
        "history": history,
        "best": best,
        "config": config,
    }
    try:
        ckpt.save_checkpoint(([run_dir / ckpt.BEST] if improved else []) + [run_dir / ckpt.LAST], state)
    except ckpt.WriteFailedError as error:
        raise ckpt.WriteFailedError(f"epoch {epoch} was not saved: {error}; "
                                    f"{_what_last_holds(run_dir, epoch - 1)}") from error
    for sink in sinks:
        sink.write(history)


def _what_last_holds(run_dir: Path | None, epochs_done: int) -> str:
    if run_dir is None:
        return "nothing is saved without a run directory"
    if epochs_done:
        return f"{run_dir / ckpt.LAST} still holds epoch {epochs_done}"
    return "no epoch had finished, so nothing was saved"


def _progress_bar(loader, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)

