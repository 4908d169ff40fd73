"""Ablation sweeps: N student configurations trained in one process against one shared teacher.

Every batch goes through the teacher once; its logits and the union of the teacher layers any
member needs are captured once and handed to each member's :class:`featkd.Distiller`, which then
runs only its student. Each member is otherwise an ordinary :class:`featkd.engine.DistillMethod`
with its own optimiser, schedule and random-number state, so a member's numbers are those of a
separate run with the same seed (tests/test_sweep.py checks this): the teacher is in eval mode and
receives no gradient, so computing its forward once or N times gives the same tensors.

What members share is what a shared teacher forward forces them to share: the batches (order and
augmentation come from the training loader's seed) and the number of epochs. A member's ``seed``
sets its student's initialisation and its own random stream (dropout, ...). A member whose loss
becomes NaN stops the whole sweep (``fit``'s divergence check), as it would stop its own run.

The sweep is one :class:`~featkd.engine.Method` for :func:`featkd.engine.fit`: one run directory,
one ``metrics.jsonl`` with ``<member>/acc1`` columns, one checkpoint to resume from. After training,
:func:`write_member_runs` splits it into one run directory per member (``members/<name>/``,
with its own ``config.yaml`` and ``metrics.jsonl``) so that ``featkd plot`` treats members like runs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd import runs
from featkd.batches import IMAGES, call_model
from featkd.config import to_dict
from featkd.teacher_input import teacher_bn_mode
from featkd.engine import DistillMethod, MethodBase, Precision, seed_everything
from featkd.engine.sinks import run_sinks
from featkd.hooks import FeatureExtractor
from featkd.model_outputs import logits_of

MEMBERS_DIR = "members"
# what a shared teacher forward forces every member to share, and deterministic kernels, a switch of the process
SHARED_KEYS = ("data", "epochs", "teacher", "device", "amp", "channels_last", "deterministic")


# ----------------------------------------------------------------------------- grids


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``{dotted key: values}`` as a list of override dicts, in order.

    ``expand_grid({"terms.0.options.kernel": ["linear", "poly"], "seed": [0, 1]})`` gives four dicts,
    the last key varying fastest.
    """
    keys = list(grid)
    for key in keys:
        values = grid[key]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"grid values for {key!r} must be a non-empty list, got {values!r}")
        repeated = [value for i, value in enumerate(values) if value in values[:i]]
        if repeated:
            raise ValueError(f"grid values for {key!r} repeat {repeated[0]!r} ({values!r}): members would be trained "
                             "twice under one name; list each value once")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def member_name(overrides: Mapping[str, Any]) -> str:
    """A readable, file-system-safe name for a grid point: ``kernel=poly,seed=1``.

    Keys are shortened to their last dotted segment unless two keys of the point share it
    (``terms.0.weight`` and ``terms.1.weight`` keep their full names).
    """
    shorts = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = [f"{short if shorts.count(short) == 1 else key}={value}"
             for short, (key, value) in zip(shorts, overrides.items())]
    name = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def member_configs(base: dict, overrides: list[str], grid: Mapping[str, Sequence[Any]]):
    """The base config and one ``(name, config)`` per grid point: ``base`` data, ``overrides``, the point.

    Raises :class:`featkd.config.ConfigError` when a point changes one of :data:`SHARED_KEYS`.
    """
    import yaml

    from featkd.config import ConfigError, check_run_config, load_config

    base_cfg = load_config(None, overrides, base=base)
    check_run_config(base_cfg)
    members = []
    for point in expand_grid(grid) if grid else [{}]:
        point_overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                           for k, v in point.items()]
        cfg = load_config(None, overrides + point_overrides, base=base)
        check_run_config(cfg)
        for key in SHARED_KEYS:
            if getattr(cfg, key) != getattr(base_cfg, key):
                raise ConfigError(f"the grid changes {key!r} (member {member_name(point)}); a sweep's members share "
                                  f"one teacher forward and one process, so {', '.join(SHARED_KEYS)} must be the "
                                  "same for every member")
        members.append((member_name(point), cfg))
    return base_cfg, members


# ----------------------------------------------------------------------------- the shared-teacher method


class SharedTeacherOutputs:
    """The current batch's teacher logits and features, filled once per step by :class:`SweepMethod`."""

    def __init__(self):
        self.batch: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.features: dict[str, torch.Tensor] = {}


class _SharedTeacherFeatures:
    """A Distiller's teacher outputs in a sweep (:meth:`featkd.Distiller.share_teacher`).

    ``(logits, features) = f(x)``, checking that ``x`` is the batch the sweep ran the teacher on.
    """

    def __init__(self, shared: "SharedTeacherOutputs", layers: Sequence[str]):
        self.shared, self.layers = shared, list(layers)

    def __call__(self, x):
        if self.shared.batch is None or self.shared.batch is not x:
            raise RuntimeError("a sweep member ran outside SweepMethod.train_step: no teacher outputs for this batch")
        return self.shared.logits, {name: self.shared.features[name] for name in self.layers}


@dataclass
class Member:
    """One student configuration of a sweep.

    ``method`` is a :class:`~featkd.engine.DistillMethod` whose distiller reads the shared teacher
    outputs (see :func:`make_member`), or any other one-model Method that needs no teacher, such as
    the student-alone baseline (:class:`~featkd.engine.SupervisedMethod`).
    """

    name: str
    method: Any
    config: dict = field(default_factory=dict)  # the member's resolved config (written to its run dir)
    rng: dict | None = None  # its own random-number state, restored around each of its steps

    @property
    def distiller(self):
        return getattr(self.method, "distiller", None)

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "rng": self.rng}

    def load_state_dict(self, state: Mapping) -> None:
        self.method.load_state_dict(state["method"])
        self.rng = state["rng"]

    @property
    def student(self) -> nn.Module:
        models = self.method.eval_models()
        if len(models) != 1:
            raise ValueError(f"sweep member {self.name!r} evaluates {len(models)} models; a member trains one student")
        return next(iter(models.values()))


def make_member(name: str, distiller, optimizer, scheduler=None, *, shared: SharedTeacherOutputs,
                config: dict | None = None, rng: dict | None = None, **method_options) -> Member:
    """A :class:`Member` whose :class:`~featkd.engine.DistillMethod` reads the teacher outputs from ``shared``.

    ``distiller`` must be set up already (its optimiser covers its adapters). ``rng`` is the random state to start from (default: the current one, i.e. right after the caller
    seeded and built this member — what a separate run would continue with).
    """
    distiller.share_teacher(_SharedTeacherFeatures(shared, distiller.teacher_layers))
    method = DistillMethod(distiller, optimizer, scheduler, **method_options)
    return Member(name, method, dict(config or {}), rng if rng is not None else ckpt.rng_state())


class SweepMethod(MethodBase):
    """A :class:`featkd.engine.Method` training several members against one teacher forward per batch."""

    def __init__(self, teacher: nn.Module, members: Sequence[Member], shared: SharedTeacherOutputs,
                 *, precision=None):
        if not members:
            raise ValueError("a sweep needs at least one member")
        names = [m.name for m in members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sweep member names must be unique; repeated: {duplicates}")
        foreign = [m.name for m in members if m.distiller is not None and m.distiller.teacher is not teacher]
        if foreign:
            raise ValueError(f"members {foreign} were built with another teacher; a sweep shares exactly one")
        teacher_bn = {m.distiller.teacher_bn for m in members if m.distiller is not None}
        if len(teacher_bn) > 1:
            raise ValueError(f"members ask for teacher_bn {sorted(teacher_bn)}; one teacher forward serves them all: "
                             "give every member the same teacher_bn")
        self.teacher_bn = teacher_bn.pop() if teacher_bn else "eval"
        distillers = [m.distiller for m in members if m.distiller is not None]
        if len({d.input_normalizations for d in distillers}) > 1:
            raise ValueError("members convert the batch for the teacher differently (student/teacher normalisation); "
                             "one teacher forward serves them all: give every member the same normalisations")
        self._teacher_input = distillers[0].teacher_input if distillers else (lambda x: x)
        formats = [d.batch_format for d in distillers]
        if any(f != formats[0] for f in formats):
            raise ValueError("members read the batch differently (BatchFormat); one teacher forward serves them all")
        self.batch_format = formats[0] if formats else IMAGES
        # fit logs the learning rate of the first member's optimiser (members usually share a schedule)
        super().__init__(members[0].method.optimizer, (), precision or members[0].method.precision)
        self.teacher, self.members, self.shared = teacher, list(members), shared
        layers = list(dict.fromkeys(layer for m in members if m.distiller is not None
                                    for layer in m.distiller.teacher_layers))
        self.teacher_layers = layers
        self._extractor = FeatureExtractor(teacher, layers, detach=True, no_grad=True) if layers else None

    def teacher_forward(self, x) -> None:
        """Run the teacher once on the batch ``x`` (read by the members' BatchFormat) and store its logits and
        features for the members."""
        self.teacher.eval()
        with self.precision.autocast(), teacher_bn_mode(self.teacher, self.teacher_bn):
            x_teacher = self._teacher_input(self.batch_format.model_input(x, "teacher"))
            if self._extractor is None:
                with torch.no_grad():
                    output, features = call_model(self.teacher, x_teacher), {}
            else:
                output, features = call_model(self._extractor, x_teacher)
        logits = logits_of(output)
        self.shared.batch, self.shared.features = x, dict(features)
        self.shared.logits = None if logits is None else logits.detach()

    def train_step(self, x, y, step, indices=None):
        self.teacher_forward(x)
        losses: dict[str, float] = {}
        outer = ckpt.rng_state()
        try:
            for member in self.members:
                ckpt.set_rng_state(member.rng if member.rng is not None else outer)
                member_losses = member.method.train_step(x, y, step, indices)
                member.rng = ckpt.rng_state()
                losses.update({f"{member.name}/{k}": v for k, v in member_losses.items()})
        finally:
            ckpt.set_rng_state(outer)
            self.shared.batch, self.shared.logits, self.shared.features = None, None, {}
        return losses

    def eval_models(self):
        return {m.name: m.student for m in self.members}

    def on_epoch_end(self, epoch):
        for member in self.members:
            member.method.on_epoch_end(epoch)

    def state_parts(self):
        return {"members": {m.name: m for m in self.members}}

    def close(self) -> None:
        """Remove the teacher hooks."""
        if self._extractor is not None:
            self._extractor.remove()
            self._extractor = None


def build_sweep(member_cfgs, teacher: nn.Module, teacher_state: dict, run,
                method_class: type[SweepMethod] = SweepMethod) -> tuple[SweepMethod, dict]:
    """The sweep of ``member_cfgs`` (from :func:`member_configs`) against ``teacher`` (loaded from
    ``teacher_state``) for a started :class:`featkd.runs.Run`, and the records the members' checkpoints
    store. Each member starts exactly where ``featkd distill`` with its config starts. ``method_class``:
    :class:`SweepMethod`, or :class:`featkd.fused.FusedSweepMethod` for students run as one batched computation."""
    first = next(iter(run.train_loader))  # the loader's order is a function of (seed, epoch): nothing consumed
    example_x = run.example(first)
    shared = SharedTeacherOutputs()
    members, model_info = [], {}
    for name, cfg in member_cfgs:
        seed_everything(cfg.seed, cfg.deterministic)
        # featkd distill builds the teacher between seeding and building the student, so the student's
        # initial weights depend on the random numbers the teacher's construction drew; draw them too
        # (a throwaway CPU copy) so that a member starts exactly where that run starts.
        _, record = ckpt.model_from_checkpoint(teacher_state, torch.device("cpu"))
        student = runs.build_model(cfg.student.name, cfg.student.options, run.info, run.device, cfg.channels_last)
        try:
            distiller = runs.build_distiller(cfg, teacher, student, batch_format=run.batch_format,
                                             **runs.input_normalizations(cfg, record, run.info))
            distiller.setup(example_x)
        except (ValueError, KeyError) as error:  # a term the member's grid point got wrong: say which member
            raise type(error)(f"sweep member {name}: {error}") from None
        config = to_dict(cfg)
        for key, weight in runs.calibrate_into(config, distiller, first, run.batch_format, run.device).items():
            print(f"sweep member {name}: weight of {key} relative to the cross-entropy resolved to {weight:.6g}")
        optimizer, scheduler = runs.build_optimization(cfg, distiller.trainable_parameters())
        members.append(make_member(name, distiller, optimizer, scheduler, shared=shared, config=config,
                                   precision=Precision(cfg.amp, run.device), grad_clip=cfg.grad_clip,
                                   steps_per_epoch=len(run.train_loader)))
        model_info[name] = ckpt.model_record(cfg.student.name, cfg.student.options, run.info)
    return method_class(teacher, members, shared), model_info


# ----------------------------------------------------------------------------- per-member run directories


def member_history(history: Iterable[Mapping[str, Any]], name: str) -> list[dict[str, Any]]:
    """One member's rows out of a sweep's metrics: ``train/<name>/kd`` -> ``train/kd``, ``<name>/acc1`` -> ``student/acc1``."""
    rows = []
    for row in history:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if key.startswith(f"train/{name}/"):
                out["train/" + key[len(f"train/{name}/"):]] = value
            elif key.startswith(f"{name}/"):
                out["student/" + key[len(name) + 1:]] = value
            elif key in ("epoch", "step", "lr", "epoch_time_s"):
                out[key] = value
        rows.append(out)
    return rows


def write_member_runs(run_dir: str | Path, members: Sequence[Member], history: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Write ``run_dir/members/<name>/`` for each member: its ``config.yaml`` and its metrics, through the
    sinks of an ordinary run (:func:`featkd.engine.sinks.run_sinks`: metrics files, TensorBoard when installed)."""
    paths = []
    sweep_environment = Path(run_dir) / ckpt.ENVIRONMENT_JSON
    # a member ran where and when its sweep did, each resume included
    environment = sweep_environment.read_text() if sweep_environment.is_file() else None
    for member in members:
        path = Path(run_dir) / MEMBERS_DIR / member.name
        path.mkdir(parents=True, exist_ok=True)
        ckpt.write_run_info(path, member.config)
        if environment is not None:
            ckpt.atomic_write_text(path / ckpt.ENVIRONMENT_JSON, environment)
        for sink in run_sinks(path):
            sink.write(member_history(history, member.name))
            sink.close()
        paths.append(path)
    return paths
