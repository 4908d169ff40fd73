"""A run from a config: what every training command builds before and around :func:`featkd.engine.fit`.

>>> cfg = load_run_config("fmnist_distill_kd_at_nst", run_dir=None, resume=False, overrides=["epochs=5"])
>>> with start_run(cfg, "distill", cfg.student.name) as run:   # device, seed, run directory (locked), loaders
...     teacher, _ = featkd.teachers.load_teacher(cfg.teacher.checkpoint, run.device, run.info)
...     student = build_model(cfg.student.name, cfg.student.options, run.info, run.device, cfg.channels_last)
...     distiller = build_distiller(cfg, teacher, student).setup(run.example())
...     optimizer, scheduler = build_optimization(cfg, distiller.trainable_parameters())
...     history = fit_run(run, DistillMethod(distiller, optimizer, scheduler), {"student": model_record(...)})

The commands in :mod:`featkd.commands` parse their arguments, call these and print; the
strategies' commands add their own config section with :func:`load_strategy_config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd import distributed
from featkd.config import (STRATEGY_CONFIG_DIR, Config, ConfigError, KDConfig, LayoutConfig,
                           RelativeWeightConfig, TermConfig, WarmupConfig, apply_overrides, build_dataclass,
                           changed_keys, check_run_config, from_dict, read_yaml, to_dict)
from featkd.locking import run_lock
from featkd.run_data import build_loaders

# What a resumed run can take from the command line: anything else (optim.lr, ...) would be overruled by the
# optimiser and schedule state it restores, or change the run halfway through.
RESUME_CHANGEABLE = ("epochs", "device")

# --------------------------------------------------------------------------- configs, fresh or resumed


def read_run_config(config: str | os.PathLike | None, run_dir: str | os.PathLike | None, resume: bool,
                    overrides: list[str], changeable: tuple[str, ...] = RESUME_CHANGEABLE) -> dict[str, Any]:
    """The config data of a run: the ``config`` file plus ``overrides``, or with ``resume`` the run's own
    ``config.yaml`` plus the overrides :func:`apply_resume_overrides` accepts (no file: the defaults plus
    ``overrides``)."""
    if resume:
        if not run_dir:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        if config:
            raise ConfigError("with --resume the config is the run's own config.yaml; drop --config "
                              "(overrides such as epochs=300 are still applied)")
        saved = Path(run_dir) / ckpt.CONFIG_YAML
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; is {str(run_dir)!r} a featkd run "
                                    "directory?")
        return apply_resume_overrides(read_yaml(saved), overrides, run_dir, changeable)
    return apply_overrides(read_yaml(config) if config is not None else {}, overrides)


def apply_resume_overrides(saved: dict, overrides: list[str], run_dir,
                           changeable: tuple[str, ...] = RESUME_CHANGEABLE) -> dict:
    """A resumed run's saved config data with ``overrides`` applied, refusing those it would not honour:
    keys other than ``changeable``, and ``epochs`` under a cosine schedule (whose restored state keeps
    the length it started with)."""
    data = apply_overrides(saved, overrides)
    changes = changed_keys(saved, data)
    refused = [key for key in changes if key not in changeable]
    if refused:
        raise ConfigError(f"--resume continues {run_dir} as it started: {', '.join(refused)} cannot change halfway "
                          f"(only {', '.join(changeable)} can); for other settings start a new run in another "
                          "--run-dir")
    if "epochs" in changes and (saved.get("schedule") or {}).get("name") == "cosine":
        old, new = changes["epochs"]
        raise ConfigError(f"epochs cannot change from {old} to {new} on --resume under schedule.name=cosine: the "
                          f"restored schedule decays over the {old} epochs it started with; start a new run with "
                          f"epochs={new} in another --run-dir")
    return data


def load_run_config(config, run_dir, resume: bool, overrides: list[str]) -> Config:
    """:func:`read_run_config` type-checked as a :class:`featkd.config.Config`, its fields checked against
    each other (:func:`featkd.config.check_run_config`)."""
    cfg = from_dict(read_run_config(config, run_dir, resume, overrides))
    check_run_config(cfg)
    return cfg


def load_strategy_config(section: str, schema: type, config, run_dir, resume: bool, overrides: list[str],
                         changeable: tuple[str, ...] = RESUME_CHANGEABLE) -> tuple[Config, Any, dict]:
    """The run config, the strategy's own ``section`` (a ``schema`` instance) and the whole resolved config.

    A strategy's config is an ordinary featkd config plus one section of its own (``dml:``, ...), checked
    against its dataclass ``schema`` by the same machinery, so unknown keys get the same suggestions; the
    saved ``config.yaml`` holds both. ``changeable``: the keys ``--resume`` may change.
    """
    command = section.replace("_", "-")
    if not resume and config is None:
        shipped = ", ".join(sorted(p.stem for p in STRATEGY_CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"featkd {command} needs --config (e.g. --config {section}; shipped: {shipped})")
    data = read_run_config(config, run_dir, resume, overrides, changeable)
    section_data = data.pop(section, None) or {}
    if not isinstance(section_data, dict):
        raise ConfigError(f"config key {section!r} must be a mapping, got {section_data!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by torchrun
        raise ConfigError(f"featkd {command} runs in one process; it does not support torchrun/DDP yet")
    cfg = from_dict(data)
    check_run_config(cfg)
    strategy_cfg = build_dataclass(schema, section_data, section)
    return cfg, strategy_cfg, {**to_dict(cfg), section: dataclasses.asdict(strategy_cfg)}


def check_sections(cfg: Config, command: str, needed: tuple[str, ...], unused: tuple[str, ...]) -> None:
    """Refuse a config that lacks what ``command`` needs or sets sections it would silently ignore."""
    for key in needed:
        if getattr(cfg, key) in (None, []):
            raise ConfigError(f"featkd {command} needs the config key {key!r} (set it in the YAML file or as an override)")
    for key in unused:
        if getattr(cfg, key) not in (None, []):
            raise ConfigError(f"featkd {command} does not use the config key {key!r}; remove it "
                              f"(is this a config for another command?)")


# --------------------------------------------------------------------------- models, optimisation


def build_model(name: str, options: dict[str, Any], info, device: torch.device, channels_last: bool) -> nn.Module:
    """A fresh model for the dataset described by ``info`` (a :class:`featkd.data.DatasetInfo`, or a text
    dataset's :class:`featkd.data.text.TextInfo`, whose vocabulary size a Hugging Face text model takes when
    its options do not set one)."""
    from featkd.models import create_model, with_data_vocabulary

    options = with_data_vocabulary(name, options, info)
    model = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels, **options).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_optimization(cfg: Config, params):
    """Optimiser and per-epoch schedule from the config's ``optim`` and ``schedule`` sections."""
    from featkd.engine import build_optimizer, build_scheduler

    optimizer = build_optimizer(params, **dataclasses.asdict(cfg.optim))
    return optimizer, build_scheduler(optimizer, epochs=cfg.epochs, **dataclasses.asdict(cfg.schedule))


def _weight(weight):
    from featkd.calibration import RelativeToCE
    from featkd.terms import Warmup

    if isinstance(weight, WarmupConfig):
        return Warmup(weight.value, epochs=weight.epochs, steps=weight.steps)
    if isinstance(weight, RelativeWeightConfig):
        return RelativeToCE(weight.relative_to_ce) if weight.resolved is None else weight.resolved
    return weight


def calibrate_run_weights(run: Run, distiller, batch) -> dict[str, float]:
    """Resolve the distiller's weights given relative to the cross-entropy on ``batch`` (the first training
    batch) and record each absolute weight in the run's saved config (``weight.resolved``), which ``config.yaml``
    holds and a resumed run reads back; ``{loss: weight}`` of those resolved now."""
    return calibrate_into(run.saved_config, distiller, batch, run.batch_format, run.device)


def calibrate_into(config: dict, distiller, batch, batch_format, device) -> dict[str, float]:
    """:func:`calibrate_run_weights` for any saved ``config`` (a sweep member's): resolve the relative weights
    on the loader's ``batch`` and record each as ``weight.resolved`` in ``config``."""
    from featkd.batches import to_device
    from featkd.calibration import calibrate_weights

    x, y, _ = batch_format.split(batch)
    resolved = calibrate_weights(distiller, to_device(x, device), to_device(y, device))
    keys = [term.key for term in distiller.terms]
    for key, weight in resolved.items():
        entry = config["kd"] if key == "kd" else config["terms"][keys.index(key)]
        entry["weight"]["resolved"] = weight
    return resolved


def _layout(layout):
    return dataclasses.asdict(layout) if isinstance(layout, LayoutConfig) else layout


def input_normalizations(cfg: Config, teacher_record: dict | None, info) -> dict[str, Any]:
    """The Distiller's ``student_normalization`` / ``teacher_normalization`` for a teacher checkpoint's
    ``teacher_record``: the run's data normalisation and the teacher's (``teacher.normalization``, else that of
    the data it was trained on) when they differ; nothing to convert otherwise."""
    if not hasattr(info, "mean"):  # token ids: nothing to normalise
        return {}
    student = (tuple(info.mean), tuple(info.std))
    given = cfg.teacher.normalization if cfg.teacher is not None else None
    if given is not None:
        teacher = (tuple(given.mean), tuple(given.std))
    elif teacher_record is not None and "dataset" in teacher_record:
        teacher = (tuple(teacher_record["dataset"]["mean"]), tuple(teacher_record["dataset"]["std"]))
    else:
        return {}
    return {} if teacher == student else {"student_normalization": student, "teacher_normalization": teacher}


def build_distiller(cfg: Config, teacher: nn.Module, student: nn.Module, **options):
    """A :class:`featkd.Distiller` from the config's ``terms``, ``kd`` and ``ce_weight``; ``options`` go to it
    (e.g. :func:`input_normalizations`)."""
    from featkd.distiller import Distiller

    return Distiller(teacher, student, **distiller_losses(cfg.terms, cfg.kd, cfg.ce_weight), compile=cfg.compile,
                     **options)


def distiller_losses(terms: list[TermConfig], kd: KDConfig | None, ce_weight: float) -> dict[str, Any]:
    """The :class:`featkd.Distiller` keyword arguments ``terms``, ``kd`` and ``ce_weight`` from their config form."""
    from featkd.terms import Term

    built = [Term(teacher=t.teacher, student=t.student, loss=t.loss, weight=_weight(t.weight), name=t.name,
                  adapter=t.adapter, options=t.options, layout=_layout(t.layout),
                  student_layout=_layout(t.student_layout), teacher_layout=_layout(t.teacher_layout))
             for t in terms]
    kd_options = None if kd is None else {"loss": kd.loss, "weight": _weight(kd.weight), **kd.options}
    return {"terms": built, "kd": kd_options, "ce_weight": ce_weight}


# --------------------------------------------------------------------------- the run


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a started run; the message says how to go on."""


@dataclass
class Run:
    """A started run: its config, device, directory and loaders, and the config its ``config.yaml`` holds.

    ``is_main``: whether this process is the one that writes files and prints (rank 0). Used as a context
    manager (``with start_run(...) as run:``) it holds the run directory's lock until the block ends, and
    turns Ctrl-C and a failed write into errors that say how to go on (the command that resumes the run).
    """

    cfg: Config
    device: torch.device
    is_main: bool
    run_dir: Path
    resume: bool
    train_loader: Any
    test_loader: Any
    saved_config: dict
    command: str
    held: contextlib.ExitStack  # the run directory's lock

    @property
    def info(self):
        """The training data's :class:`featkd.data.DatasetInfo` (a text dataset's ``TextInfo``)."""
        return self.train_loader.info

    @property
    def batch_format(self):
        """How the run's batches are read (:class:`featkd.BatchFormat`): images unless the loader says otherwise."""
        from featkd.batches import IMAGES

        return getattr(self.train_loader, "batch_format", IMAGES)

    def example(self, item=None, n: int = 2):
        """The first ``n`` samples of a training batch (the loader's first when ``item`` is None) on the run's device,
        as its :attr:`batch_format` reads it: the dry-run input from which adapters and losses learn the shapes."""
        from featkd.batches import head, to_device

        if item is None:  # the loader's order is a function of (seed, epoch): no state consumed
            item = next(iter(self.train_loader))
        return head(to_device(self.batch_format.split(item)[0], self.device), n)

    def next_step(self) -> str:
        """What to do after the run stopped: the command that resumes it, or a fresh start when it holds
        nothing yet."""
        if ckpt.holds_results(self.run_dir):
            return f"resume with: featkd {self.command} --run-dir {self.run_dir} --resume"
        return "run the same command again"

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.held.close()
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
            raise RunInterrupted(f"interrupted; {self.next_step()}") from None
        if isinstance(error, ckpt.WriteFailedError):
            raise ckpt.WriteFailedError(f"{error}; {self.next_step()}") from error


def default_run_dir(command: str, model_name: str) -> Path:
    """``runs/<command>-<model>-<YYYYmmdd-HHMMSS>`` (the same on every rank)."""
    stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_name)
    return Path("runs") / f"{command}-{safe}-{stamp}"


def start_run(cfg: Config, command: str, model_name: str, run_dir=None, resume: bool = False,
              saved_config: dict | None = None) -> Run:
    """Join the process group (under torchrun), seed, pick the device, the run directory (and take its
    lock: :func:`featkd.locking.run_lock`) and the loaders.

    ``saved_config`` is what the run's ``config.yaml`` holds (default: ``cfg``; a strategy passes its
    whole resolved config, its own section included). ``command`` names the ``featkd`` command that
    resumes the run. Use the result in a ``with`` block, which releases the lock.
    """
    from featkd.engine import resolve_device, seed_everything

    device = resolve_device(cfg.device)
    is_main = distributed.init(device).is_main
    seed_everything(cfg.seed, cfg.deterministic)
    if is_main and (note := nondeterminism_note(device, cfg.deterministic)):
        print(note, file=sys.stderr)
    run_dir = Path(run_dir) if run_dir else default_run_dir(command, model_name)
    with contextlib.ExitStack() as held:
        if is_main:
            held.enter_context(run_lock(run_dir))
        train_loader, test_loader = build_loaders(cfg, device)
        return Run(cfg, device, is_main, run_dir, resume, train_loader, test_loader,
                   to_dict(cfg) if saved_config is None else saved_config, command, held.pop_all())


def nondeterminism_note(device: torch.device, deterministic: bool) -> str | None:
    """The line a run prints when the same seed may not give the same numbers: CUDA's default kernels (cuDNN's
    convolution backward, atomic adds) sum in a varying order. On an H200, five one-epoch runs of
    ``fmnist_distill_kd_at_nst`` at seed 0 scored 35.8-83.7% on the test split, three with ``deterministic=true``
    the same digits (benchmarks/results/gpu_h200.md). The CPU's kernels are deterministic at a fixed thread count."""
    if device.type != "cuda" or deterministic:
        return None
    return ("note: CUDA's default kernels are not run-to-run deterministic, so this seed may give other numbers "
            "when run again; start it with deterministic=true for equal reruns (slower)")


def fit_run(run: Run, method, model_info: dict[str, dict]) -> list[dict]:
    """:func:`featkd.engine.fit` on the run's loaders and directory, then leave the process group."""
    from featkd.engine import fit

    try:
        return fit(method, run.train_loader, run.test_loader, run.run_dir, run.cfg.epochs, resume=run.resume,
                   config=run.saved_config, model_info=model_info, device=run.device,
                   channels_last=run.cfg.channels_last, batch_format=run.batch_format,
                   log=print if run.is_main else (lambda message: None))
    finally:
        distributed.shutdown()


def train_model(config, run_dir, resume: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Run, list[dict]]:
    """``featkd train``'s work: the config's ``model`` trained with cross-entropy into ``run_dir`` (or that run
    resumed, ``config`` then None); returns the run and its history."""
    from featkd.checkpoint import model_record
    from featkd.engine import Precision, SupervisedMethod

    cfg = load_run_config(config, run_dir, resume, list(overrides))
    check_sections(cfg, "train", needed=("model",), unused=("teacher", "student", "terms", "kd"))
    with start_run(cfg, "train", cfg.model.name, run_dir, resume) as run:
        model = build_model(cfg.model.name, cfg.model.options, run.info, run.device, cfg.channels_last)
        optimizer, scheduler = build_optimization(cfg, model.parameters())
        runner = distributed.wrap(model, run.device)
        if cfg.compile:
            runner = torch.compile(runner)
        method = SupervisedMethod(runner, optimizer, scheduler, precision=Precision(cfg.amp, run.device),
                                  grad_clip=cfg.grad_clip, batch_format=run.batch_format)
        history = fit_run(run, method, {"model": model_record(cfg.model.name, cfg.model.options, run.info)})
    return run, history
