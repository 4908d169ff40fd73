"""``featkd adversarial``: adversarial KD with a conditional discriminator (see :mod:`featkd.strategies.adversarial`).

    featkd adversarial --config adversarial --run-dir runs/adv teacher.checkpoint=runs/teacher/last.pt
    featkd adversarial --run-dir runs/adv --resume
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from featkd import checkpoint as ckpt
from featkd.commands.distill import model_from_checkpoint
from featkd.commands.train import (add_run_arguments, build_loaders, build_model, build_optimization,
                                   default_run_dir, launch, model_record, reports_user_errors, start)
from featkd.config import ConfigError, OptimConfig
from featkd.strategies.adversarial import OBJECTIVES, AdversarialKD, LogitDiscriminator
from featkd.strategies.runner import load_strategy_config


@dataclass
class DiscriminatorConfig:
    """The residual MLP on logits: hidden ``width`` and number of residual ``blocks``."""

    width: int = 128
    blocks: int = 2


@dataclass
class AdversarialConfig:
    """The ``adversarial:`` section; the student also uses the top-level ``ce_weight`` (labels).

    ``optim`` is the discriminator's optimiser (the student's is the top-level ``optim``);
    both follow the top-level ``schedule``.
    """

    objective: str = "bce"
    adv_weight: float = 1.0
    class_weight: float = 1.0
    l1_weight: float = 1.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, weight_decay=0.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import Precision

    cfg, adv, resolved = load_strategy_config(args, "adversarial", AdversarialConfig)
    if adv.objective not in OBJECTIVES:
        raise ConfigError(f"adversarial.objective must be one of {OBJECTIVES}, got {adv.objective!r}")
    if cfg.teacher is None or not cfg.teacher.checkpoint or cfg.student is None:
        raise ConfigError("featkd adversarial needs teacher.checkpoint (the last.pt of a 'featkd train' run) "
                          "and student.name")
    device = start(cfg)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir("adversarial", cfg.student.name)
    train_loader, test_loader = build_loaders(cfg, device)
    info = train_loader.info
    teacher, record = model_from_checkpoint(ckpt.load_checkpoint(cfg.teacher.checkpoint), device,
                                            source=cfg.teacher.checkpoint)
    if (record["num_classes"], record["in_channels"]) != (info.num_classes, info.in_channels):
        raise ValueError(f"teacher {cfg.teacher.checkpoint} was trained for {record['num_classes']} classes of "
                         f"{record['in_channels']}-channel images, but {info.name} has {info.num_classes} classes "
                         f"of {info.in_channels}-channel images")
    student = build_model(cfg.student.name, cfg.student.options, info, device, cfg.channels_last)
    discriminator = LogitDiscriminator(info.num_classes, adv.discriminator.width, adv.discriminator.blocks).to(device)
    student_opt, student_sched = build_optimization(cfg, student.parameters())
    disc_cfg = dataclasses.replace(cfg, optim=adv.optim)  # the same schedule, the discriminator's optimiser
    disc_opt, disc_sched = build_optimization(disc_cfg, discriminator.parameters())
    method = AdversarialKD(student, teacher, discriminator, student_opt, disc_opt, student_sched, disc_sched,
                           objective=adv.objective, adv_weight=adv.adv_weight, class_weight=adv.class_weight,
                           l1_weight=adv.l1_weight, ce_weight=cfg.ce_weight, precision=Precision(cfg.amp, device))
    records = {"student": model_record(cfg.student.name, cfg.student.options, info)}
    return launch(method, cfg, args, run_dir, train_loader, test_loader, device, records, config=resolved)
