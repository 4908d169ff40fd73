"""``featkd train``: train one model (a teacher, or a student without distillation) with cross-entropy.

    featkd train --config fmnist_teacher_wrn16_2 --run-dir runs/teacher epochs=30 optim.lr=0.05
    featkd train --run-dir runs/teacher --resume            # continue a killed run
    torchrun --nproc_per_node=2 -m featkd.cli train ...      # DistributedDataParallel

This module also holds the steps every training command shares (reading the
config, the run directory, data loaders, models, optimiser/schedule, ``fit``);
``featkd distill`` and the strategy commands build on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd import distributed
from featkd.config import Config, ConfigError, DataConfig, load_config, to_dict


# --------------------------------------------------------------------------- shared by the training commands


def reports_user_errors(run):
    """Print a mistake in the config, paths or run directory (exit status 2) or a diverged run (exit
    status 1) as one line, not a traceback."""
    from featkd.engine import DivergenceError

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        command = run.__module__.rsplit(".", 1)[-1].replace("_", "-")
        try:
            return run(args)
        except (ConfigError, ckpt.RunDirectoryExistsError, FileNotFoundError) as error:
            print(f"featkd {command}: error: {error}", file=sys.stderr)
            return 2
        except DivergenceError as error:
            print(f"featkd {command}: training diverged: {error}", file=sys.stderr)
            return 1

    return wrapper



def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--run-dir``, ``--resume`` and the ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config: a path or the name of a shipped config (featkd/configs/*.yaml)")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where checkpoints, metrics and config.yaml go (default: runs/<command>-<model>-<time>); "
                             "must be new unless --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last.pt, with its saved config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides parsed as YAML values, e.g. optim.lr=0.05 "
                             "schedule.milestones=[60,120] terms.0.weight=100 kd=null")


def load_run_config(args: argparse.Namespace) -> Config:
    """The config of this run: ``--config`` plus overrides, or the resumed run's ``config.yaml`` plus overrides."""
    if args.resume:
        if not args.run_dir:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        if args.config:
            raise ConfigError("with --resume the config is the run's own config.yaml; drop --config "
                              "(overrides such as epochs=300 are still applied)")
        saved = Path(args.run_dir) / ckpt.CONFIG_YAML
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; is {args.run_dir!r} a featkd run directory?")
        return load_config(saved, args.overrides)
    return load_config(args.config, args.overrides)


def check_sections(cfg: Config, command: str, needed: tuple[str, ...], unused: tuple[str, ...]) -> None:
    """Refuse a config that lacks what ``command`` needs or sets sections it would silently ignore."""
    for key in needed:
        if getattr(cfg, key) in (None, []):
            raise ConfigError(f"featkd {command} needs the config key {key!r} (set it in the YAML file or as an override)")
    for key in unused:
        if getattr(cfg, key) not in (None, []):
            raise ConfigError(f"featkd {command} does not use the config key {key!r}; remove it "
                              f"(is this a config for another command?)")


def default_run_dir(command: str, model_name: str) -> Path:
    """``runs/<command>-<model>-<YYYYmmdd-HHMMSS>`` (the same on every rank)."""
    stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_name)
    return Path("runs") / f"{command}-{safe}-{stamp}"


def build_datasets(data: DataConfig):
    """The training split (with its transfer-set edits) and the test split."""
    from featkd.data import add_unlabeled, load_dataset, mark_unlabeled, omit_classes

    # Subsets are chosen with a fixed seed so that runs with different training seeds see the same data.
    train = load_dataset(data.name, data.root, "train", limit=data.limit, **data.options)
    test = load_dataset(data.name, data.root, "test", limit=data.test_limit, **data.options)
    if data.omit_classes:
        train = omit_classes(train, data.omit_classes)
    if data.unlabeled_fraction:
        train = mark_unlabeled(train, data.unlabeled_fraction)
    if data.extra_unlabeled is not None:
        extra = data.extra_unlabeled
        train = add_unlabeled(train, load_dataset(extra.name, extra.root, "train", limit=extra.limit, **extra.options))
    return train, test


def build_loaders(cfg: Config, device: torch.device):
    """Training and test :class:`featkd.data.DeviceLoader` for this rank; ``data.batch_size`` is the global batch."""
    from featkd.data import DeviceLoader

    rank = distributed.info()
    if cfg.data.batch_size % rank.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over "
                          f"{rank.world_size} processes")
    train, test = build_datasets(cfg.data)
    shard = dict(rank=rank.rank, world_size=rank.world_size, device=device)
    train_loader = DeviceLoader(train, cfg.data.batch_size // rank.world_size, shuffle=True, augment=cfg.data.augment,
                                seed=cfg.seed, drop_last=cfg.data.drop_last, pad=cfg.data.pad, flip=cfg.data.flip,
                                pad_mode=cfg.data.pad_mode, **shard)
    test_loader = DeviceLoader(test, cfg.data.eval_batch_size, shuffle=False, augment=False, drop_last=False, **shard)
    return train_loader, test_loader


def build_model(name: str, options: dict[str, Any], info, device: torch.device, channels_last: bool) -> nn.Module:
    """A fresh model for the dataset described by ``info`` (a :class:`featkd.data.DatasetInfo`)."""
    from featkd.models import create_model

    model = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels, **options).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_record(name: str, options: dict[str, Any], info) -> dict[str, Any]:
    """What a checkpoint stores next to a model's weights so that ``distill``/``eval`` can rebuild it."""
    return {"name": name, "options": dict(options), "num_classes": info.num_classes,
            "in_channels": info.in_channels, "dataset": info._asdict()}


def build_optimization(cfg: Config, params):
    """Optimiser and per-epoch schedule from the config's ``optim`` and ``schedule`` sections."""
    from featkd.engine import build_optimizer, build_scheduler

    optimizer = build_optimizer(params, **dataclasses.asdict(cfg.optim))
    return optimizer, build_scheduler(optimizer, epochs=cfg.epochs, **dataclasses.asdict(cfg.schedule))


def start(cfg: Config):
    """Join the process group (under torchrun), seed, and pick the device."""
    from featkd.engine import resolve_device, seed_everything

    device = resolve_device(cfg.device)
    distributed.init(device)
    seed_everything(cfg.seed, cfg.deterministic)
    return device


def launch(method, cfg: Config, args: argparse.Namespace, run_dir: Path, train_loader, test_loader, device,
           model_info: dict[str, dict], config: dict | None = None) -> int:
    """Run :func:`featkd.engine.fit` and report where the results are.

    ``config`` is what is saved as the run's config.yaml (default: ``cfg``; a strategy passes its
    whole resolved config, its own section included)."""
    from featkd.engine import fit

    is_main = distributed.is_main_process()
    try:
        history = fit(method, train_loader, test_loader, run_dir, cfg.epochs, resume=args.resume,
                      config=to_dict(cfg) if config is None else config, model_info=model_info, device=device, channels_last=cfg.channels_last,
                      log=print if is_main else (lambda message: None))
    finally:
        distributed.shutdown()
    if is_main and history:
        print(f"finished: {run_dir} (best.pt, last.pt, metrics.jsonl)")
    return 0


# --------------------------------------------------------------------------- featkd train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import Precision, SupervisedMethod

    cfg = load_run_config(args)
    check_sections(cfg, "train", needed=("model",), unused=("teacher", "student", "terms", "kd"))
    device = start(cfg)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir("train", cfg.model.name)
    train_loader, test_loader = build_loaders(cfg, device)
    info = train_loader.info
    model = build_model(cfg.model.name, cfg.model.options, info, device, cfg.channels_last)
    optimizer, scheduler = build_optimization(cfg, model.parameters())
    runner = distributed.wrap(model, device)
    if cfg.compile:
        runner = torch.compile(runner)
    method = SupervisedMethod(runner, optimizer, scheduler, precision=Precision(cfg.amp, device),
                              grad_clip=cfg.grad_clip)
    record = {"model": model_record(cfg.model.name, cfg.model.options, info)}
    return launch(method, cfg, args, run_dir, train_loader, test_loader, device, record)
