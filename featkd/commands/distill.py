"""``featkd distill``: distill a teacher checkpoint into a student with feature terms and KD from a config.

    featkd distill --config fmnist_distill_kd_at_nst --run-dir runs/kd_at_nst \\
        teacher.checkpoint=runs/fmnist_teacher_wrn16_2/last.pt
    featkd distill --run-dir runs/kd_at_nst --resume

The teacher is rebuilt from what ``featkd train`` stored in its checkpoint
(model name, classes, input channels) — nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from featkd import checkpoint as ckpt
from featkd import distributed
from featkd.commands.train import (add_run_arguments, build_loaders, build_model, build_optimization, check_sections,
                                   default_run_dir, launch, load_run_config, model_record,
                                   reports_user_errors, start)
from featkd.config import Config, ConfigError, WarmupConfig


def model_from_checkpoint(state: dict, device: torch.device, name: str | None = None,
                          source: str = "the checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild a model from a loaded featkd checkpoint: the one it holds, or ``name`` when it holds several."""
    from featkd.models import create_model

    models = state.get("models", {})
    if name is None:
        if len(models) != 1:
            raise ValueError(f"{source} holds the models {sorted(models)}; say which one to use")
        name = next(iter(models))
    if name not in models:
        raise KeyError(f"{source} has no model {name!r}; it holds {sorted(models)}")
    record = models[name]
    model = create_model(record["name"], num_classes=record["num_classes"], in_channels=record["in_channels"],
                         **record.get("options", {}))
    model.load_state_dict(record["state_dict"])
    return model.to(device), record


def _weight(weight):
    from featkd.distiller import Warmup

    if isinstance(weight, WarmupConfig):
        return Warmup(weight.value, epochs=weight.epochs, steps=weight.steps)
    return weight


def build_distiller(cfg: Config, teacher: nn.Module, student: nn.Module):
    """A :class:`featkd.Distiller` from the config's ``terms``, ``kd`` and ``ce_weight``."""
    from featkd.distiller import Distiller, Term

    terms = [Term(teacher=t.teacher, student=t.student, loss=t.loss, weight=_weight(t.weight), name=t.name,
                  adapter=t.adapter, options=t.options) for t in cfg.terms]
    kd = None if cfg.kd is None else {"loss": cfg.kd.loss, "weight": _weight(cfg.kd.weight), **cfg.kd.options}
    return Distiller(teacher, student, terms=terms, kd=kd, ce_weight=cfg.ce_weight, compile=cfg.compile)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import DistillMethod, Precision, evaluate

    cfg = load_run_config(args)
    check_sections(cfg, "distill", needed=("teacher", "student"), unused=("model",))
    if not cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is empty: give the last.pt of a 'featkd train' run")
    device = start(cfg)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir("distill", cfg.student.name)
    train_loader, test_loader = build_loaders(cfg, device)
    info = train_loader.info
    teacher_state = ckpt.load_checkpoint(cfg.teacher.checkpoint)
    teacher, record = model_from_checkpoint(teacher_state, device, source=cfg.teacher.checkpoint)
    if (record["num_classes"], record["in_channels"]) != (info.num_classes, info.in_channels):
        raise ValueError(f"teacher {cfg.teacher.checkpoint} was trained for {record['num_classes']} classes of "
                         f"{record['in_channels']}-channel images, but {info.name} has {info.num_classes} classes of "
                         f"{info.in_channels}-channel images")
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    if not args.resume:
        scores = evaluate(teacher, test_loader, device=device, channels_last=cfg.channels_last)
        if distributed.is_main_process():
            print(f"teacher {record['name']} ({cfg.teacher.checkpoint}): " +
                  "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    student = build_model(cfg.student.name, cfg.student.options, info, device, cfg.channels_last)
    distiller = build_distiller(cfg, teacher, student)
    example_x, _ = next(iter(train_loader))  # the loader's order is a function of (seed, epoch): no state consumed
    distiller.setup(example_x[:2])
    optimizer, scheduler = build_optimization(cfg, distiller.trainable_parameters())
    method = DistillMethod(distiller, optimizer, scheduler, precision=Precision(cfg.amp, device),
                           grad_clip=cfg.grad_clip, steps_per_epoch=len(train_loader),
                           forward=distributed.wrap(distiller, device))
    record = {"student": model_record(cfg.student.name, cfg.student.options, info)}
    return launch(method, cfg, args, run_dir, train_loader, test_loader, device, record)
