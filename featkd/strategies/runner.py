"""What the ``featkd dml`` / ``born-again`` / ``adversarial`` commands share.

Each strategy's config is an ordinary featkd config (``featkd.config``: data, optim,
schedule, epochs, seed, ...) plus one section of its own (``dml:``, ``born_again:``,
``adversarial:``) checked against a dataclass schema by the same machinery, so unknown
keys get the same suggestions and the saved ``config.yaml`` holds both.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from featkd import checkpoint as ckpt
from featkd import config as config_lib
from featkd.data import DeviceLoader, load_dataset
from featkd.engine import build_optimizer, build_scheduler
from featkd.models import create_model

STRATEGY_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "strategies"


def add_run_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--config``, ``key=value`` overrides, ``--run-dir``, ``--resume`` (as the engine's commands)."""
    parser.add_argument("--config", help=f"a YAML config file, or the name of one in featkd/configs/strategies "
                                         f"(e.g. {example})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of config keys, e.g. optim.lr=0.05 epochs=3")
    parser.add_argument("--run-dir", required=True, help="where checkpoints and metrics go (never overwritten)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")


def _config_path(path: str) -> Path:
    candidate = Path(path)
    if not candidate.is_file() and candidate.parent == Path("."):
        for shipped in (STRATEGY_CONFIG_DIR / candidate.name, STRATEGY_CONFIG_DIR / f"{candidate.name}.yaml"):
            if shipped.is_file():
                return shipped
    return config_lib.resolve_config_path(path)


def load_strategy_config(args: argparse.Namespace, section: str, schema: type) -> tuple[config_lib.Config, Any, dict]:
    """The engine config, this strategy's section and the resolved whole (to save as config.yaml).

    On ``--resume`` the run directory's saved ``config.yaml`` is the base; ``--config`` and the
    overrides apply on top of it.
    """
    data: dict[str, Any] = {}
    if args.resume:
        saved = Path(args.run_dir) / ckpt.CONFIG_YAML
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {str(saved)!r} does not exist; is {args.run_dir!r} a run "
                                    f"directory of 'featkd {section.replace('_', '-')}'?")
        data = yaml.safe_load(saved.read_text()) or {}
    elif args.config is None:
        raise config_lib.ConfigError(f"--config is required (e.g. --config {section}); "
                                     f"shipped: {', '.join(sorted(p.stem for p in STRATEGY_CONFIG_DIR.glob('*.yaml')))}")
    if args.config is not None:
        data.update(config_lib.read_yaml(_config_path(args.config)))
    data = config_lib.apply_overrides(data, args.overrides)
    section_data = data.pop(section, None) or {}
    if not isinstance(section_data, dict):
        raise config_lib.ConfigError(f"config key {section!r} must be a mapping, got {section_data!r}")
    cfg = config_lib.from_dict(data)
    # the engine's schema builder (private there), so that this section reports errors the same way
    strategy_cfg = config_lib._build(schema, section_data, section)
    resolved = {**config_lib.to_dict(cfg), section: dataclasses.asdict(strategy_cfg)}
    return cfg, strategy_cfg, resolved


def build_loaders(cfg: config_lib.Config, device) -> tuple[DeviceLoader, DeviceLoader]:
    """Training and test loaders from ``cfg.data`` (training split with ``limit``, test with ``test_limit``)."""
    d = cfg.data
    if d.omit_classes or d.unlabeled_fraction or d.extra_unlabeled is not None:
        raise config_lib.ConfigError("the strategy commands do not apply transfer-set edits (data.omit_classes, "
                                     "data.unlabeled_fraction, data.extra_unlabeled); remove them from the config.")
    train = load_dataset(d.name, d.root, "train", limit=d.limit, seed=cfg.seed, **d.options)
    test = load_dataset(d.name, d.root, "test", limit=d.test_limit, seed=cfg.seed, **d.options)
    train_loader = DeviceLoader(train, d.batch_size, shuffle=True, augment=d.augment, device=device, seed=cfg.seed,
                                pad=d.pad, flip=d.flip)
    test_loader = DeviceLoader(test, d.eval_batch_size, shuffle=False, augment=False, device=device,
                               drop_last=False)
    return train_loader, test_loader


def model_info(model_cfg: config_lib.ModelConfig, info) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the model (stored next to its weights)."""
    return {"name": model_cfg.name, "options": dict(model_cfg.options), "num_classes": info.num_classes,
            "in_channels": info.in_channels}


def build_model(model_cfg: config_lib.ModelConfig, info, device) -> nn.Module:
    """A fresh model for the dataset described by ``info`` (a ``DatasetInfo``)."""
    return create_model(model_cfg.name, num_classes=info.num_classes, in_channels=info.in_channels,
                        **model_cfg.options).to(device)


def load_model(path: str | Path, device) -> nn.Module:
    """The (first) model stored in a featkd checkpoint, rebuilt from its stored name and shape."""
    state = ckpt.load_checkpoint(path, map_location=device)
    for name, entry in state.get("models", {}).items():
        if "name" in entry and "num_classes" in entry:
            model = create_model(entry["name"], num_classes=entry["num_classes"],
                                 in_channels=entry.get("in_channels", 3), **entry.get("options", {}))
            model.load_state_dict(entry["state_dict"])
            return model.to(device)
    raise ValueError(f"{str(path)!r} holds no model with its name and shape (models: "
                     f"{sorted(state.get('models', {}))}); use a checkpoint written by 'featkd train'.")


def build_optimization(params, cfg: config_lib.Config, optim: config_lib.OptimConfig | None = None):
    """Optimiser (``cfg.optim`` unless ``optim`` is given) and its per-epoch schedule (``cfg.schedule``)."""
    optimizer = build_optimizer(params, **dataclasses.asdict(optim or cfg.optim))
    return optimizer, build_scheduler(optimizer, epochs=cfg.epochs, **dataclasses.asdict(cfg.schedule))
