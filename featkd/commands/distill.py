"""``featkd distill``: distill a teacher checkpoint into a student with feature terms and KD from a config.

    featkd distill --config fmnist_distill_kd_at_nst --run-dir runs/kd_at_nst \\
        teacher.checkpoint=runs/fmnist_teacher_wrn16_2/last.pt
    featkd distill --run-dir runs/kd_at_nst --resume

The teacher is rebuilt from what ``featkd train`` stored in its checkpoint
(model name, classes, input channels) — nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from featkd import distributed, runs
from featkd.checkpoint import model_record
from featkd.commands._common import add_run_arguments, finished, reports_user_errors
from featkd.config import ConfigError
from featkd.teachers import load_teacher


add_arguments = add_run_arguments  # --config, --run-dir, --resume, key=value overrides


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import DistillMethod, Precision, evaluate

    cfg = runs.load_run_config(args.config, args.run_dir, args.resume, args.overrides)
    runs.check_sections(cfg, "distill", needed=("teacher", "student"), unused=("model",))
    if not cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is empty: give the last.pt of a 'featkd train' run")
    with runs.start_run(cfg, "distill", cfg.student.name, args.run_dir, args.resume) as run:
        teacher, record = load_teacher(cfg.teacher.checkpoint, run.device, run.info)
        if cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        student = runs.build_model(cfg.student.name, cfg.student.options, run.info, run.device, cfg.channels_last)
        distiller = runs.build_distiller(cfg, teacher, student, batch_format=run.batch_format,
                                         **runs.input_normalizations(cfg, record, run.info))
        if not args.resume:  # the teacher on the test split, its inputs converted as the distiller converts them
            checked = teacher if distiller.input_normalizations is None else nn.Sequential(distiller.teacher_input,
                                                                                           teacher)
            scores = evaluate(checked, run.test_loader, device=run.device, channels_last=cfg.channels_last,
                              batch_format=run.batch_format)
            if run.is_main:
                print(f"teacher {record['name']} ({cfg.teacher.checkpoint}): " +
                      "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        # the loader's order is a function of (seed, epoch): no state consumed
        first_batch = next(iter(run.train_loader))
        distiller.setup(run.example(first_batch))
        for key, weight in runs.calibrate_run_weights(run, distiller, first_batch).items():
            if run.is_main:
                print(f"weight of {key} relative to the cross-entropy resolved to {weight:.6g}")
        optimizer, scheduler = runs.build_optimization(cfg, distiller.trainable_parameters())
        method = DistillMethod(distiller, optimizer, scheduler, precision=Precision(cfg.amp, run.device),
                               grad_clip=cfg.grad_clip, steps_per_epoch=len(run.train_loader),
                               forward=distributed.wrap(distiller, run.device))
        history = runs.fit_run(run, method, {"student": model_record(cfg.student.name, cfg.student.options, run.info)})
    return finished(run, history)
