"""Checkpoints, run directories and metrics files.

Everything here protects what a user already has:

* a checkpoint is written to a temporary file in the same directory and moved
  into place with ``os.replace`` (atomic on POSIX), so a run killed mid-write
  leaves the previous ``last.pt`` intact;
* a run directory that already holds a run is never reused silently: the
  caller must ask to resume it or pick a new directory;
* the metrics files are rewritten from the history stored in the checkpoint,
  so a run resumed after a kill has exactly one row per finished epoch.

A checkpoint stores, next to each evaluated model's weights, the record :func:`model_record`
gives (model name, options, classes, input channels), so that :func:`model_from_checkpoint`
rebuilds the model without any other file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = "featkd-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_YAML = "config.yaml"
ENVIRONMENT_JSON = "environment.json"


class RunDirectoryExistsError(FileExistsError):
    """The run directory already holds a run and resuming was not asked for."""


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(paths: str | os.PathLike | list, state: dict[str, Any]) -> None:
    """Save ``state`` (anything ``torch.save`` takes) atomically to one path or several, serialised once."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    for path in paths if isinstance(paths, (list, tuple)) else [paths]:
        atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing or foreign."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.is_dir():
            candidates = [p.name for p in (path / BEST, path / LAST) if p.is_file()]
            if candidates:
                hint = f" It is a run directory; pass {path / candidates[0]} instead."
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.{hint}")
    # weights_only=False: checkpoints hold RNG states (numpy arrays, Python tuples) and configs.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a featkd checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r}); "
            "teachers must be trained with 'featkd train' first."
        )
    return state


# --------------------------------------------------------------------------- models in checkpoints


def model_record(name: str, options: dict[str, Any], info) -> dict[str, Any]:
    """What a checkpoint stores next to a model's weights so that ``distill``/``eval`` can rebuild it.

    ``info`` is the :class:`featkd.data.DatasetInfo` of the data the model is trained on.
    """
    return {"name": name, "options": dict(options), "num_classes": info.num_classes,
            "in_channels": info.in_channels, "dataset": info._asdict()}


def model_from_checkpoint(state: dict, device: torch.device, name: str | None = None,
                          source: str = "the checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild a model from a loaded featkd checkpoint: the one it holds, or ``name`` when it holds several."""
    from featkd.models import create_model

    models = state.get("models", {})
    if name is None:
        if len(models) != 1:
            raise ValueError(f"{source} holds the models {sorted(models)}; say which one to use")
        name = next(iter(models))
    if name not in models:
        raise KeyError(f"{source} has no model {name!r}; it holds {sorted(models)}")
    record = models[name]
    model = create_model(record["name"], num_classes=record["num_classes"], in_channels=record["in_channels"],
                         **record.get("options", {}))
    model.load_state_dict(record["state_dict"])
    return model.to(device), record


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a training step may draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------- run directories


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool) -> Path:
    """Create a fresh run directory, or check that one exists with a checkpoint to resume from.

    A directory that already has files in it is never reused without ``resume``:
    this raises :class:`RunDirectoryExistsError` instead of overwriting a run.
    """
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / LAST).is_file():
            raise FileNotFoundError(
                f"cannot resume: {str(run_dir / LAST)!r} does not exist "
                "(the run never finished an epoch, or the --run-dir is wrong). Start it again without --resume."
            )
        return run_dir
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirectoryExistsError(
            f"run directory {str(run_dir)!r} already exists and is not empty; "
            "pass --resume to continue that run, or choose a new --run-dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def environment_info() -> dict[str, Any]:
    """Versions and devices, written next to every run so its numbers can be traced."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_run_info(run_dir: str | os.PathLike, config: dict[str, Any] | None) -> None:
    """Write ``config.yaml`` (the full resolved config, seed included) and ``environment.json``."""
    import yaml

    run_dir = Path(run_dir)
    if config is not None:
        atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(run_dir / ENVIRONMENT_JSON, json.dumps(environment_info(), indent=2) + "\n")


# --------------------------------------------------------------------------- metrics


def write_metrics(run_dir: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the per-epoch history (one row per epoch)."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / METRICS_JSONL, "".join(json.dumps(row) + "\n" for row in history))
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / METRICS_CSV, text.getvalue())


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of ``metrics.jsonl`` in a run directory."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; is {str(run_dir)!r} a featkd run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
