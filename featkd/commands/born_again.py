"""``featkd born-again``: Born-Again Networks, N generations in one command (see featkd.strategies.born_again)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from featkd.config import ConfigError, TermConfig, WarmupConfig
from featkd.distiller import Distiller, Term, Warmup
from featkd.engine import DistillMethod, Precision, SupervisedMethod, resolve_device, seed_everything
from featkd.strategies.born_again import train_generations
from featkd.strategies.runner import (add_run_arguments, build_loaders, build_model, build_optimization,
                                      load_model, load_strategy_config, model_info)


@dataclass
class BornAgainConfig:
    """The ``born_again:`` section: how many generations follow generation 0, and where generation 0 comes from.

    The network is the top-level ``model``; each born-again generation's objective is the
    top-level ``kd`` (BAN: ``{loss: kd, weight: 1, options: {T: 1}}``), ``ce_weight`` (0 for the
    teacher's output as the only target) and feature ``terms`` (the teacher being the previous
    generation).
    """

    generations: int = 2
    teacher_checkpoint: str | None = None


def _term(term: TermConfig) -> Term:
    return Term(term.teacher, term.student, term.loss, _weight(term.weight), term.name, term.adapter,
                dict(term.options))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "born_again")


def run(args: argparse.Namespace) -> int:
    cfg, ban, resolved = load_strategy_config(args, "born_again", BornAgainConfig)
    if cfg.model is None:
        raise ConfigError("featkd born-again needs model.name: the architecture of every generation")
    if cfg.kd is None and not cfg.terms:
        raise ConfigError("featkd born-again needs kd (e.g. {loss: kd, weight: 1, options: {T: 1}}) or terms: "
                          "what each generation learns from the previous one")
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    precision = Precision(cfg.amp, device)
    train_loader, test_loader = build_loaders(cfg, device)
    info = train_loader.info
    example = next(iter(test_loader))[0][:2]
    kd = kd_spec(cfg)

    def make_method(generation, student, teacher):
        if teacher is None:
            optimizer, scheduler = build_optimization(student.parameters(), cfg)
            return SupervisedMethod(student, optimizer, scheduler, precision=precision, grad_clip=cfg.grad_clip,
                                    name="student")
        distiller = Distiller(teacher, student, [_term(t) for t in cfg.terms], kd=kd, ce_weight=cfg.ce_weight)
        distiller.setup(example)
        optimizer, scheduler = build_optimization(distiller.trainable_parameters(), cfg)
        return DistillMethod(distiller, optimizer, scheduler, precision=precision, grad_clip=cfg.grad_clip,
                             steps_per_epoch=len(train_loader))

    generation0 = load_model(ban.teacher_checkpoint, device) if ban.teacher_checkpoint else None
    summary = train_generations(lambda: build_model(cfg.model, info, device), make_method, train_loader, test_loader,
                                args.run_dir, ban.generations, cfg.epochs, seed=cfg.seed, resume=args.resume,
                                generation0=generation0, config=resolved, model_info=model_info(cfg.model, info),
                                device=device, channels_last=cfg.channels_last)
    for row in summary:
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return 0


def kd_spec(cfg) -> dict | None:
    """The ``kd`` argument of each born-again generation's Distiller, from the config's ``kd`` section."""
    return None if cfg.kd is None else {"loss": cfg.kd.loss, "weight": _weight(cfg.kd.weight), **cfg.kd.options}


def _weight(weight):
    return Warmup(weight.value, weight.epochs, weight.steps) if isinstance(weight, WarmupConfig) else weight
