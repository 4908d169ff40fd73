"""``featkd adversarial``: adversarial KD with a conditional discriminator (see :mod:`featkd.strategies.adversarial`).

    featkd adversarial --config adversarial --run-dir runs/adv teacher.checkpoint=runs/teacher/last.pt
    featkd adversarial --run-dir runs/adv --resume
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from featkd import runs
from featkd.checkpoint import model_record
from featkd.commands._common import add_run_arguments, finished, reports_user_errors
from featkd.config import ConfigError, OptimConfig
from featkd.strategies.adversarial import OBJECTIVES, AdversarialKD, LogitDiscriminator
from featkd.teachers import load_teacher


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


add_arguments = add_run_arguments  # --config, --run-dir, --resume, key=value overrides


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import Precision

    cfg, adv, resolved = runs.load_strategy_config("adversarial", AdversarialConfig, args.config, args.run_dir,
                                                   args.resume, args.overrides)
    if adv.objective not in OBJECTIVES:
        raise ConfigError(f"adversarial.objective must be one of {OBJECTIVES}, got {adv.objective!r}")
    if cfg.teacher is None or not cfg.teacher.checkpoint or cfg.student is None:
        raise ConfigError("featkd adversarial needs teacher.checkpoint (the last.pt of a 'featkd train' run) "
                          "and student.name")
    with runs.start_run(cfg, "adversarial", cfg.student.name, args.run_dir, args.resume, resolved) as run:
        teacher, _ = load_teacher(cfg.teacher.checkpoint, run.device, run.info)
        student = runs.build_model(cfg.student.name, cfg.student.options, run.info, run.device, cfg.channels_last)
        discriminator = LogitDiscriminator(run.info.num_classes, adv.discriminator.width,
                                           adv.discriminator.blocks).to(run.device)
        student_opt, student_sched = runs.build_optimization(cfg, student.parameters())
        disc_cfg = dataclasses.replace(cfg, optim=adv.optim)  # the same schedule, the discriminator's optimiser
        disc_opt, disc_sched = runs.build_optimization(disc_cfg, discriminator.parameters())
        method = AdversarialKD(student, teacher, discriminator, student_opt, disc_opt, student_sched, disc_sched,
                               objective=adv.objective, adv_weight=adv.adv_weight, class_weight=adv.class_weight,
                               l1_weight=adv.l1_weight, ce_weight=cfg.ce_weight,
                               precision=Precision(cfg.amp, run.device))
        history = runs.fit_run(run, method, {"student": model_record(cfg.student.name, cfg.student.options, run.info)})
    return finished(run, history)
