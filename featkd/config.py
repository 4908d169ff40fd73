"""Typed run configs: YAML files plus dotted ``key=value`` overrides.

>>> cfg = load_config("fmnist_distill_kd_at_nst.yaml", ["optim.lr=0.05", "terms.1.weight=25", "kd=null"])

``--config`` takes a path or the name of a file shipped in ``featkd/configs``.
Override values are parsed as YAML scalars or lists (``[60, 120]``, ``null``,
``true``). The schema is the dataclasses below, built by :func:`featkd.schema.build_dataclass`:
an unknown key, a value of the wrong type or outside its field's range raises
:class:`ConfigError` naming the key (and suggesting the closest valid one). :func:`to_dict` gives the fully resolved config, which every
run saves as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from featkd.schema import ConfigError, build_dataclass

__all__ = ["CONFIG_DIR", "STRATEGY_CONFIG_DIR", "Config", "ConfigError", "DataConfig", "DatasetConfig", "KDConfig",
           "LayoutConfig", "ModelConfig", "NormalizationConfig", "OptimConfig", "ScheduleConfig", "TeacherConfig",
           "TermConfig", "WarmupConfig", "apply_overrides", "build_dataclass", "changed_keys", "check_run_config",
           "describe_yaml_error", "from_dict", "load_config", "read_yaml", "resolve_config_path", "to_dict"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STRATEGY_CONFIG_DIR = CONFIG_DIR / "strategies"
SHIPPED_CONFIG_DIRS = (CONFIG_DIR, STRATEGY_CONFIG_DIR)


# --------------------------------------------------------------------------- schema


@dataclass
class DatasetConfig:
    """A dataset for :func:`featkd.data.load_dataset` (the extra unlabelled data of a transfer set)."""

    name: str = "fashion_mnist"
    root: str | None = None
    limit: int | None = field(default=None, metadata={"min": 1})
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training/test data and the transfer set.

    ``limit`` / ``test_limit`` keep a class-balanced subset. ``augment`` crops the image padded by ``pad``
    pixels (``pad_mode``: ``zeros``, or ``reflect`` as the official AT code) and flips it. ``drop_last``
    drops the last, smaller training batch of each epoch (``false``: every example once an epoch, as
    the official AT code). Transfer-set edits
    apply to the training split only: ``omit_classes`` drops classes,
    ``unlabeled_fraction`` hides that fraction of labels (label -1: no CE, still
    KD), ``extra_unlabeled`` appends another dataset's images as unlabelled.
    """

    name: str = "fashion_mnist"
    root: str | None = None
    limit: int | None = field(default=None, metadata={"min": 1})
    test_limit: int | None = field(default=None, metadata={"min": 1})
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = field(default=128, metadata={"min": 1})
    drop_last: bool = True
    eval_batch_size: int = field(default=500, metadata={"min": 1})
    augment: bool = True
    pad: int = 4
    pad_mode: str = "zeros"
    flip: bool = True
    omit_classes: list[int] = field(default_factory=list)
    unlabeled_fraction: float = 0.0
    extra_unlabeled: DatasetConfig | None = None


@dataclass
class ModelConfig:
    """A model for :func:`featkd.models.create_model`; ``options`` go to its constructor."""

    name: str = "wrn16_1"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class NormalizationConfig:
    """A per-channel input normalisation, on the images' 0..1 scale."""

    mean: list[float] = field(default_factory=list, metadata={"finite": True})
    std: list[float] = field(default_factory=list, metadata={"above": 0, "finite": True})


@dataclass
class TeacherConfig:
    """The teacher of ``featkd distill``: a checkpoint written by ``featkd train``. ``normalization``: the one it
    expects (default: its training data's, which the checkpoint records); the batch is converted to it."""

    checkpoint: str = ""
    normalization: NormalizationConfig | None = None


@dataclass
class WarmupConfig:
    """A weight ramped linearly from 0 to ``value`` over ``epochs`` or ``steps``."""

    value: float = field(default=1.0, metadata={"min": 0})
    epochs: float | None = field(default=None, metadata={"above": 0})
    steps: int | None = field(default=None, metadata={"min": 1})


@dataclass
class RelativeWeightConfig:
    """A weight relative to the cross-entropy (:class:`featkd.calibration.RelativeToCE`): the term's gradient on the
    student is ``relative_to_ce`` times the cross-entropy's on the first training batch. The run fills in
    ``resolved``, the absolute weight it came to, and a resumed run uses that."""

    relative_to_ce: float = field(default=1.0, metadata={"above": 0, "finite": True})
    resolved: float | None = field(default=None, metadata={"min": 0, "finite": True})


@dataclass
class LayoutConfig:
    """A feature layout in full (:class:`featkd.layouts.Layout`); null leaves a field to the model or the shape."""

    kind: str = "NLC"
    prefix_tokens: int | None = None
    grid: list[int] | None = None
    tokens: str = "patch"


@dataclass
class TermConfig:
    """The config form (``terms:``) of one :class:`featkd.Term`, which :func:`featkd.runs.build_distiller`
    builds from it. DML's terms between peers have their own form, ``strategies.dml.PeerTermConfig``.
    ``student_layout`` / ``teacher_layout`` (``layout``: both): ``NHWC``, ``tokens``... or a :class:`LayoutConfig`."""

    teacher: str | list[str] = ""
    student: str | list[str] | None = None
    loss: str = "at"
    weight: float | WarmupConfig | RelativeWeightConfig = field(default=1.0, metadata={"min": 0})
    name: str | None = None
    adapter: str | None = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    layout: str | LayoutConfig | None = None
    student_layout: str | LayoutConfig | None = None
    teacher_layout: str | LayoutConfig | None = None


@dataclass
class KDConfig:
    """The logit term: a :func:`featkd.losses.build_logit_loss` name, its weight and options (e.g. ``{T: 4}``)."""

    loss: str = "kd"
    weight: float | WarmupConfig | RelativeWeightConfig = field(default=1.0, metadata={"min": 0})
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """See :func:`featkd.engine.build_optimizer`."""

    name: str = "sgd"
    lr: float = field(default=0.1, metadata={"above": 0})
    momentum: float = field(default=0.9, metadata={"min": 0, "below": 1})
    weight_decay: float = field(default=5e-4, metadata={"min": 0})
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """See :func:`featkd.engine.build_scheduler` (epoch-based; the AT/NST papers' schedule by default:
    stages of 60/60/40/40 epochs; the official AT code's are milestones [59, 119, 159] with
    ``restart_momentum_at_milestones``)."""

    name: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160], metadata={"min": 1})
    gamma: float = field(default=0.2, metadata={"above": 0})
    warmup_epochs: int = field(default=0, metadata={"min": 0})
    min_factor: float = field(default=0.0, metadata={"min": 0, "max": 1})
    restart_momentum_at_milestones: bool = False


@dataclass
class Config:
    """One run. ``featkd train`` uses ``model``; ``featkd distill`` uses ``teacher``, ``student``, ``terms``, ``kd``."""

    seed: int = 0
    epochs: int = field(default=200, metadata={"min": 1})
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    grad_clip: float | None = field(default=None, metadata={"above": 0})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig | None = None
    teacher: TeacherConfig | None = None
    student: ModelConfig | None = None
    terms: list[TermConfig] = field(default_factory=list)
    kd: KDConfig | None = None
    ce_weight: float = field(default=1.0, metadata={"min": 0})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build and type-check a :class:`Config` from plain data (as loaded from YAML)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    if isinstance(data.get("terms"), list):
        from featkd.published import resolve_term_weights

        data = {**data, "terms": resolve_term_weights(data["terms"], "terms")}
    return build_dataclass(Config, data)


def check_run_config(cfg: Config) -> None:
    """The checks between fields of a config a run trains with (each field's own range is checked as it is
    built): a multistep schedule's milestones strictly increasing and inside the run."""
    schedule = cfg.schedule
    if schedule.name != "multistep":
        return
    milestones = schedule.milestones
    if any(later <= earlier for earlier, later in zip(milestones, milestones[1:])):
        raise ConfigError(f"config key 'schedule.milestones' must be strictly increasing, got {milestones}")
    if milestones and milestones[-1] > cfg.epochs:
        raise ConfigError(f"config key 'schedule.milestones' {milestones} must lie inside the run (each <= "
                          f"epochs={cfg.epochs}), or the lr never decays there; set schedule.milestones to epochs "
                          "of this run, or schedule.name=cosine or schedule.name=constant")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` holds)."""
    return dataclasses.asdict(config)


def changed_keys(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every leaf where two configs' plain data differ
    (list items by index: ``terms.0.weight``). A key on one side only has None on the other, so a key a
    newer featkd added with the value None is no change."""
    flat_old, flat_new = _leaves(old), _leaves(new)
    return {key: (flat_old.get(key), flat_new.get(key)) for key in dict.fromkeys([*flat_old, *flat_new])
            if flat_old.get(key) != flat_new.get(key)}


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    items = list(data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else [])
    if not items:  # a plain value, or an empty mapping or list
        return {prefix: data}
    leaves: dict[str, Any] = {}
    for key, value in items:
        leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


# --------------------------------------------------------------------------- files and overrides


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of one shipped in ``featkd/configs`` or ``featkd/configs/strategies``
    (with or without ``.yaml``)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.parent == Path("."):
        for folder in SHIPPED_CONFIG_DIRS:
            for shipped in (folder / candidate.name, folder / f"{candidate.name}.yaml"):
                if shipped.is_file():
                    return shipped
    shipped_names = sorted(p.stem for folder in SHIPPED_CONFIG_DIRS for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(candidate.stem, shipped_names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"config file {str(path)!r} not found.{hint} Shipped configs: {', '.join(shipped_names)}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file (empty file → empty mapping)."""
    path = resolve_config_path(path)
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {describe_yaml_error(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """What the YAML parser objects to and where, in one line."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (list items by index: ``terms.0.weight=10``) to a copy of ``data``."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value {text!r} is not valid YAML ({describe_yaml_error(error)}); "
                              "close its brackets, or quote it if it is a string") from None
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, where)]
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, node, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:-1])!r} is not a mapping")
    return data


def _list_index(part: str, items: list, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        raise ConfigError(f"override key {where!r}: {part!r} is not an index of a list with {len(items)} items")
    return int(part)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (if given) over ``base`` (e.g. a resumed run's saved config), apply ``overrides``, type-check."""
    data = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    return from_dict(apply_overrides(data, overrides))
