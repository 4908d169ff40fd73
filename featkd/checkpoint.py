"""Checkpoints, run directories and metrics files.

Everything here protects what a user already has:

* a checkpoint is written to a temporary file in the same directory and moved
  into place with ``os.replace`` (atomic on POSIX), so a run killed mid-write
  leaves the previous ``last.pt`` intact;
* a run directory that already holds a run is never reused silently: the
  caller must ask to resume it or pick a new directory (one that holds only what a run
  writes before its first epoch ends is started again, there being nothing in it to keep);
* a run directory is trained by one process at a time (:func:`featkd.locking.run_lock`);
* a write that fails (a full disk) raises :class:`WriteFailedError` naming the file, and
  leaves the file it would have replaced as it was;
* the metrics files are rewritten from the history stored in the checkpoint,
  so a run resumed after a kill has exactly one row per finished epoch.

A checkpoint stores, next to each evaluated model's weights, the record :func:`model_record`
gives (model name, options, classes, input channels), so that :func:`model_from_checkpoint`
rebuilds the model without any other file.

A checkpoint proves its integrity: ``torch.load`` does not check the zip's CRCs, so changed bytes inside
a tensor load as changed weights. :func:`save_checkpoint` therefore writes the state serialised by
``torch.save`` as bytes next to their sha256 (:data:`SEALED_FORMAT`), and :func:`load_checkpoint` refuses
bytes that do not match it. A file written before featkd sealed its checkpoints loads with a warning that
it cannot be verified.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featkd.provenance import ENVIRONMENT_JSON, run_environment

CHECKPOINT_FORMAT = "featkd-checkpoint/1"  # the state: a dict with this "format"
# the file: {"format": SEALED_FORMAT, "sha256": hex digest of the payload, "payload": the torch.save bytes of the
# state as a uint8 tensor (stored as they are; pickle protocol 2 would re-encode a bytes object)}
SEALED_FORMAT = "featkd-checkpoint-sealed/1"
LAST = "last.pt"
BEST = "best.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_YAML = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
# what a run writes before its first epoch ends: a directory holding only these has no result to keep
# (the TensorBoard writer opens its event file when the run starts; it holds curves only after an epoch,
# and then last.pt exists too)
RUN_START_FILES = frozenset({CONFIG_YAML, ENVIRONMENT_JSON})


class RunDirectoryExistsError(FileExistsError):
    """The run directory already holds a run and resuming was not asked for."""


class WriteFailedError(OSError):
    """A file could not be written (a full disk, a lost mount); the file it would replace is unchanged."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, overwritten, or not a checkpoint at all."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before featkd recorded checksums: its contents cannot be verified."""


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    Raises :class:`WriteFailedError` when the write fails; ``path`` is then as it was before.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteFailedError(f"could not write {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise WriteFailedError(f"could not write {path}: {error.strerror or error} "
                                   f"({'left as it was' if path.exists() else 'not created'})") from error
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(paths: str | os.PathLike | list, state: dict[str, Any]) -> None:
    """Save ``state`` (anything ``torch.save`` takes) with its sha256, atomically to one path or several,
    serialised once."""
    payload = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, payload)
    sealed = io.BytesIO()
    torch.save({"format": SEALED_FORMAT, "sha256": hashlib.sha256(payload.getvalue()).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload.getvalue()), dtype=torch.uint8)}, sealed)
    for path in paths if isinstance(paths, (list, tuple)) else [paths]:
        atomic_write_bytes(path, sealed.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing, damaged or foreign.

    For a run's ``last.pt`` or ``best.pt`` the error also says whether the other one can be used.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.is_dir():
            # last.pt first: a teacher is the run's last epoch (best.pt is the epoch chosen on the test set)
            candidates = [p.name for p in (path / LAST, path / BEST) if p.is_file()]
            if candidates:
                hint = f" It is a run directory; pass {path / candidates[0]} instead."
        elif path.name in (BEST, LAST):
            hint = _other_checkpoint_hint(path)
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.{hint}")
    try:
        state, verified = _read_checkpoint(path, map_location)
    except CorruptCheckpointError as error:
        hint = _other_checkpoint_hint(path) if path.name in (BEST, LAST) else ""
        raise CorruptCheckpointError(f"{error}{hint}") from None
    if not verified and isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        warnings.warn(f"checkpoint {str(path)!r} was written before featkd recorded checksums: its contents "
                      "cannot be verified", UnverifiedCheckpointWarning, stacklevel=2)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a featkd checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r}); "
            "teachers must be trained with 'featkd train' first."
        )
    return state


def _read_checkpoint(path: Path, map_location) -> tuple[Any, bool]:
    """What ``path`` holds, and whether its sha256 was verified (False: a file written before featkd sealed
    its checkpoints, or not a featkd checkpoint at all)."""
    stored = _torch_load(path, path, map_location)
    if not (isinstance(stored, dict) and stored.get("format") == SEALED_FORMAT):
        return stored, False
    payload = stored.get("payload")
    payload = payload.cpu().numpy().tobytes() if isinstance(payload, torch.Tensor) else b""
    if hashlib.sha256(payload).hexdigest() != stored.get("sha256"):
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is damaged: its contents do not match the sha256 "
                                     "recorded when it was written.")
    return _torch_load(io.BytesIO(payload), path, map_location), True


def _torch_load(source: Path | io.BytesIO, path: Path, map_location) -> Any:
    try:
        # weights_only=False: checkpoints hold RNG states (numpy arrays, Python tuples) and configs.
        return torch.load(source, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:  # damaged bytes
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} cannot be read: it is truncated or damaged "
                                     f"({detail}).") from None


def _other_checkpoint_hint(path: Path) -> str:
    """Whether the other checkpoint of ``path``'s run directory (best.pt for last.pt and back) can be used."""
    other = path.with_name(BEST if path.name == LAST else LAST)
    if not other.is_file():
        return f" {other.name} does not exist either: nothing in {str(path.parent)!r} can be used; start the run again."
    try:
        epoch = _read_checkpoint(other, "cpu")[0]["epoch"]
    except (CorruptCheckpointError, KeyError, TypeError):
        return f" {other.name} cannot be read either: nothing in {str(path.parent)!r} can be used; start the run again."
    if other.name == BEST:
        return (f" {other} is intact (epoch {epoch}): evaluate it with featkd eval --run-dir {path.parent} --which best, "
                f"or copy it over {path.name} to resume from epoch {epoch}.")
    return f" {other} is intact (epoch {epoch}): evaluate it with featkd eval --run-dir {path.parent} --which last."


# --------------------------------------------------------------------------- models in checkpoints


def model_record(name: str, options: dict[str, Any], info) -> dict[str, Any]:
    """What a checkpoint stores next to a model's weights so that ``distill``/``eval`` can rebuild it.

    ``info`` is the :class:`featkd.data.DatasetInfo` of the data the model is trained on (a text dataset's
    ``TextInfo``, whose vocabulary size a Hugging Face model was built with: recorded in its options).
    """
    from featkd.models import with_data_vocabulary

    return {"name": name, "options": with_data_vocabulary(name, options, info), "num_classes": info.num_classes,
            "in_channels": info.in_channels, "dataset": info._asdict()}


def ensemble_record(member_records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint stores next to the weights of a :class:`featkd.models.ProbabilityAverage` (DML's
    peers, BAN's generations): its members' records in order, so that :func:`model_from_checkpoint`
    rebuilds it like any model. The members' weights are the ensemble's own, so a given record's are dropped."""
    return {"ensemble": "probability_average",
            "members": [{key: value for key, value in record.items() if key != "state_dict"}
                        for record in member_records]}


def _rebuild(record: dict) -> nn.Module:
    from featkd.models import ProbabilityAverage, create_model

    if "ensemble" in record:
        return ProbabilityAverage([_rebuild(member) for member in record["members"]])
    return create_model(record["name"], num_classes=record["num_classes"], in_channels=record["in_channels"],
                        **record.get("options", {}))


def model_from_checkpoint(state: dict, device: torch.device, name: str | None = None,
                          source: str = "the checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild a model from a loaded featkd checkpoint: the one it holds, or ``name`` when it holds several.

    A model saved without its record (an ensemble or a repro run's model, by an older featkd) cannot be
    rebuilt: a ValueError says so and names the models of the checkpoint that can be."""
    models = state.get("models", {})
    if name is None:
        if len(models) != 1:
            raise ValueError(f"{source} holds the models {sorted(models)}; say which one to use")
        name = next(iter(models))
    if name not in models:
        raise ValueError(f"{source} has no model {name!r}; it holds {sorted(models)}")
    record = models[name]
    if "name" not in record and "ensemble" not in record:
        others = sorted(key for key, other in models.items() if "name" in other or "ensemble" in other)
        raise ValueError(f"{source} holds the weights of {name!r} without the record that rebuilds it (saved by an "
                         "older featkd)" + (f"; the models it can rebuild: {others}" if others else ""))
    model = _rebuild(record)
    what = "an ensemble" if "ensemble" in record else f"a {record['name']}"
    load_weights(model, record["state_dict"], f"{source} records {what} but holds the weights of another "
                 "architecture", "it was edited, or written by a featkd whose models differ: train it again")
    return model.to(device), record


def load_weights(module: nn.Module, state_dict: dict, mismatch: str, fix: str = "") -> None:
    """``module.load_state_dict(state_dict)``, refusing weights saved from another architecture in one
    sentence instead of torch's list of every key: ``mismatch``, how many keys are missing, unexpected or
    of another shape (an example of each), then ``fix``."""
    own = module.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    resized = [key for key in own if key in state_dict and tuple(own[key].shape) != tuple(state_dict[key].shape)]
    if missing or unexpected or resized:
        counts = [f"{len(missing)} weights missing, e.g. {missing[0]!r}" if missing else "",
                  f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}" if unexpected else "",
                  f"{len(resized)} of another shape, e.g. {resized[0]!r}: {tuple(state_dict[resized[0]].shape)} "
                  f"saved, {tuple(own[resized[0]].shape)} here" if resized else ""]
        raise ValueError(f"{mismatch} ({'; '.join(c for c in counts if c)}){'; ' + fix if fix else ''}")
    module.load_state_dict(state_dict)


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


def holds_results(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` exists and holds more than what runs write before their first epoch ends
    (:data:`RUN_START_FILES`, in it or in its subdirectories, and TensorBoard event files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return run_dir.exists()
    return any(p.name not in RUN_START_FILES and p.relative_to(run_dir).parts[0] != TENSORBOARD_DIR
               for p in run_dir.rglob("*") if not p.is_dir())


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool) -> Path:
    """Create a fresh run directory, or check that one exists with a checkpoint to resume from.

    A directory that holds results is never reused without ``resume``: this raises
    :class:`RunDirectoryExistsError` instead of overwriting a run. One that holds only what a run
    writes before its first epoch ends (a run stopped in its first epoch) is started again.
    """
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / LAST).is_file():
            raise FileNotFoundError(
                f"cannot resume: {str(run_dir / LAST)!r} does not exist "
                "(the run never finished an epoch, or the --run-dir is wrong). Start it again without --resume."
            )
        return run_dir
    if holds_results(run_dir):
        raise RunDirectoryExistsError(
            f"run directory {str(run_dir)!r} already exists and is not empty; "
            "pass --resume to continue that run, or choose a new --run-dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def restore_best(run_dir: str | os.PathLike, state: dict[str, Any]) -> str | None:
    """On resume: put back a missing or unreadable ``best.pt`` when ``last.pt`` (whose loaded ``state`` is
    given) holds the same epoch, or say exactly what is gone. Returns what to tell the user, or None."""
    run_dir = Path(run_dir)
    best, path = state.get("best"), run_dir / BEST
    if best is None:
        return None
    with contextlib.suppress(CorruptCheckpointError):
        if path.is_file() and _read_checkpoint(path, "cpu")[0].get("epoch") == best["epoch"]:
            return None
    if best["epoch"] == state["epoch"]:  # save_checkpoint wrote the same bytes to both
        atomic_write_bytes(path, (run_dir / LAST).read_bytes())
        return f"restored {path} from {LAST} (both hold epoch {best['epoch']})"
    return (f"warning: {path} (epoch {best['epoch']}, {best['metric']} {best['value']:.4g}) is missing or damaged "
            f"and cannot be rebuilt, {LAST} holding epoch {state['epoch']}: a new {BEST} is written when "
            f"{best['metric']} improves on {best['value']:.4g}; until then evaluate {LAST} (--which last)")


def write_run_info(run_dir: str | os.PathLike, config: dict[str, Any] | None, from_epoch: int = 0) -> None:
    """Write ``config.yaml`` (the full resolved config, seed included) and ``environment.json``
    (:func:`featkd.provenance.run_environment`: featkd's version and commit, libraries, hardware; a run
    resumed after ``from_epoch`` epochs keeps the environments of the epochs before)."""
    import yaml

    run_dir = Path(run_dir)
    if config is not None:
        atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(config, sort_keys=False))
    previous = None
    if from_epoch:
        try:
            previous = json.loads((run_dir / ENVIRONMENT_JSON).read_text())
        except (OSError, ValueError):
            pass  # run_environment records that the earlier environments could not be read
        previous = previous if isinstance(previous, dict) else None
    atomic_write_text(run_dir / ENVIRONMENT_JSON, json.dumps(run_environment(from_epoch, previous), indent=2) + "\n")


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
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            # a kept or copied run's metrics are what it is read back from: name the damaged file, not just the line
            raise ValueError(f"{path} line {number} is not a JSON row ({error.msg}): the file is damaged; copy it "
                             f"again from where it came from, or move {run_dir} away to train that run again") from None
    return rows
