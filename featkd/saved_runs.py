"""Reading a run directory of any kind: ``featkd train``/``distill``, a sweep and its members, DML, born-again,
adversarial KD and the repro protocols' runs. Which checkpoints hold its models, the settings its models are
evaluated with, and what it records of how it was made (``config.yaml``, ``environment.json``,
``metrics.jsonl``): what ``featkd eval`` and ``featkd show`` read.

The kinds differ in where things are:

* a sweep's checkpoint holds every member's model; ``members/<name>/`` holds a member's config and metrics only;
* a born-again run holds one run directory per generation (``gen0/``, ``gen1/``, ...) and ``born_again.json``;
* a sweep saves its base config, overrides and grid (``base:``, ``overrides:``, ``grid:``); a strategy adds its
  own section (``dml:``, ``born_again:``, ``adversarial:``); the repro protocols record their settings in
  their own keys, with no ``data:`` section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from featkd import checkpoint as ckpt
from featkd.config import apply_overrides
from featkd.strategies.born_again import SUMMARY as BORN_AGAIN_SUMMARY
from featkd.sweep import MEMBERS_DIR

# What evaluating a model reads of its run's config; the rest (strategy sections, the recipe) it does not use.
EVALUATION_SECTIONS = ("data", "device", "amp")


def sweep_holding(run_dir: str | Path) -> Path | None:
    """The sweep directory whose checkpoint holds the model of ``run_dir`` when ``run_dir`` is one of its
    members' directories (``SWEEP/members/NAME``); None otherwise."""
    run_dir = Path(run_dir)
    sweep = run_dir.parent.parent
    if run_dir.parent.name == MEMBERS_DIR and any((sweep / name).is_file() for name in (ckpt.LAST, ckpt.BEST)):
        return sweep
    return None


def generation_dirs(run_dir: str | Path) -> list[Path]:
    """A born-again run's generation directories in order (``gen0``, ``gen1``, ...); empty for other runs."""
    run_dir = Path(run_dir)
    if not (run_dir / BORN_AGAIN_SUMMARY).is_file():
        return []
    found = [p for p in run_dir.glob("gen*") if p.is_dir() and p.name[3:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[3:]))


def run_checkpoints(run_dir: str | Path, which: str = "last") -> list[tuple[str, Path]]:
    """``(prefix, path)`` of each checkpoint that holds ``run_dir``'s models, ``which`` being ``last`` or
    ``best``: the run's own (prefix ``""``), or every generation's of a born-again run (prefix ``gen1/``).

    A sweep member's directory has no checkpoint of its own: the ValueError names the sweep's and the
    command that evaluates the member."""
    run_dir = Path(run_dir)
    own = run_dir / f"{which}.pt"
    if own.exists():
        return [("", own)]
    sweep = sweep_holding(run_dir)
    if sweep is not None:
        raise ValueError(f"{run_dir} is a member of the sweep {sweep}, whose checkpoint {sweep / own.name} holds its "
                         f"model: featkd eval --run-dir {sweep} --model {run_dir.name}"
                         + (" --which best" if which == "best" else ""))
    generations = [(f"{g.name}/", g / own.name) for g in generation_dirs(run_dir) if (g / own.name).exists()]
    return generations or [("", own)]  # no checkpoint at all: loading it says what is wrong


def is_sweep_config(saved: dict[str, Any]) -> bool:
    """Whether a saved config is a sweep's: its base config, overrides and grid."""
    return isinstance(saved.get("base"), dict) and "grid" in saved


def run_sections(saved: dict[str, Any]) -> dict[str, Any]:
    """The run config of a saved ``config.yaml``: a sweep's base config with its overrides applied (what
    every member shares), any other run's as saved."""
    if is_sweep_config(saved):
        return apply_overrides(dict(saved["base"]), saved.get("overrides") or [])
    return saved


def evaluation_base(saved: dict[str, Any] | None, models: dict[str, dict]) -> dict[str, Any]:
    """What :func:`featkd.config.load_config` starts from to evaluate a checkpoint's ``models`` with the data
    settings of the run that saved them (``saved``, its config): its data, device and amp sections. A run
    that records no ``data:`` (the repro protocols) is evaluated on the dataset its models were trained on."""
    sections = run_sections(saved or {})
    base = {key: sections[key] for key in EVALUATION_SECTIONS if key in sections}
    if "data" not in base:
        names = [record["dataset"]["name"] for record in models.values() if "dataset" in record]
        if names:
            base["data"] = {"name": names[0]}
    return base


def saved_without_record(record: dict) -> bool:
    """A model saved without the record that rebuilds it: an ensemble, or a repro run's model, saved by an
    older featkd (:func:`featkd.checkpoint.model_record`, :func:`featkd.checkpoint.ensemble_record`)."""
    return "name" not in record and "ensemble" not in record
@dataclass
class RunRecord:
    """What a run directory records of how it was made: its config, its environment and its last metrics row."""

    path: Path
    config: dict[str, Any]
    environment: dict[str, Any] | None
    final_metrics: dict[str, Any] | None
    sweep: Path | None  # the sweep whose checkpoint holds this member's model
    generations: list[Path]


def read_run(run_dir: str | Path) -> RunRecord:
    """The :class:`RunRecord` of ``run_dir``; FileNotFoundError when it holds no ``config.yaml``."""
    run_dir = Path(run_dir)
    config_file = run_dir / ckpt.CONFIG_YAML
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a featkd run directory: it has no {ckpt.CONFIG_YAML} "
                                "(run directories are written by featkd train, distill, sweep, dml, born-again, "
                                "adversarial, repro and demo)")
    config = yaml.safe_load(config_file.read_text()) or {}
    environment_file = run_dir / ckpt.ENVIRONMENT_JSON
    environment = json.loads(environment_file.read_text()) if environment_file.is_file() else None
    metrics = ckpt.read_metrics(run_dir) if (run_dir / ckpt.METRICS_JSONL).is_file() else []
    return RunRecord(run_dir, config, environment, metrics[-1] if metrics else None, sweep_holding(run_dir),
                     generation_dirs(run_dir))


def run_kind(run: RunRecord) -> str:
    """What made the run, in words: ``featkd distill``, ``a member of the sweep runs/x``, ``a repro run``, ..."""
    config = run.config
    if run.sweep is not None:
        return f"a member of the sweep {run.sweep}"
    if run.generations:
        return f"featkd born-again ({len(run.generations)} generations: {', '.join(g.name for g in run.generations)})"
    if is_sweep_config(config):
        return "featkd sweep"
    for section, command in (("dml", "featkd dml"), ("born_again", "a generation of featkd born-again"),
                             ("adversarial", "featkd adversarial")):
        if section in config:
            return command
    if "data" not in config:
        return "a repro run"
    return "featkd distill" if config.get("teacher") else "featkd train"
