"""``featkd adversarial``: adversarial KD with a conditional discriminator (see featkd.strategies.adversarial)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from featkd.config import ConfigError, OptimConfig
from featkd.engine import Precision, fit, resolve_device, seed_everything
from featkd.strategies.adversarial import OBJECTIVES, AdversarialKD, LogitDiscriminator
from featkd.strategies.runner import (add_run_arguments, build_loaders, build_model, build_optimization,
                                      load_model, load_strategy_config, model_info)


@dataclass
class DiscriminatorConfig:
    """The residual MLP on logits: hidden ``width`` and number of residual ``blocks``."""

    width: int = 128
    blocks: int = 2


@dataclass
class AdversarialConfig:
    """The ``adversarial:`` section. The student also uses the top-level ``ce_weight`` (labels)."""

    objective: str = "bce"
    adv_weight: float = 1.0
    class_weight: float = 1.0
    l1_weight: float = 1.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, weight_decay=0.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "adversarial")


def run(args: argparse.Namespace) -> int:
    cfg, adv, resolved = load_strategy_config(args, "adversarial", AdversarialConfig)
    if adv.objective not in OBJECTIVES:
        raise ConfigError(f"adversarial.objective must be one of {OBJECTIVES}, got {adv.objective!r}")
    if cfg.teacher is None or not cfg.teacher.checkpoint or cfg.student is None:
        raise ConfigError("featkd adversarial needs teacher.checkpoint (a 'featkd train' checkpoint) and student.name")
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    train_loader, test_loader = build_loaders(cfg, device)
    info = train_loader.info
    teacher = load_model(cfg.teacher.checkpoint, device)
    student = build_model(cfg.student, info, device)
    discriminator = LogitDiscriminator(info.num_classes, adv.discriminator.width, adv.discriminator.blocks).to(device)
    student_opt, student_sched = build_optimization(student.parameters(), cfg)
    disc_opt, disc_sched = build_optimization(discriminator.parameters(), cfg, adv.optim)
    method = AdversarialKD(student, teacher, discriminator, student_opt, disc_opt, student_sched, disc_sched,
                           objective=adv.objective, adv_weight=adv.adv_weight, class_weight=adv.class_weight,
                           l1_weight=adv.l1_weight, ce_weight=cfg.ce_weight, precision=Precision(cfg.amp, device))
    fit(method, train_loader, test_loader, args.run_dir, cfg.epochs, resume=args.resume, config=resolved,
        model_info={"student": model_info(cfg.student, info)}, device=device, channels_last=cfg.channels_last)
    return 0
