"""``featkd train``: train one model (a teacher, or a student without distillation) with cross-entropy.

    featkd train --config fmnist_teacher_wrn16_2 --run-dir runs/teacher epochs=30 optim.lr=0.05
    featkd train --run-dir runs/teacher --resume            # continue a killed run
    torchrun --nproc_per_node=2 -m featkd.cli train ...      # DistributedDataParallel
"""

from __future__ import annotations

import argparse

import torch

from featkd import distributed, runs
from featkd.checkpoint import model_record
from featkd.commands._common import add_run_arguments, finished, reports_user_errors


add_arguments = add_run_arguments  # --config, --run-dir, --resume, key=value overrides


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import Precision, SupervisedMethod

    cfg = runs.load_run_config(args.config, args.run_dir, args.resume, args.overrides)
    runs.check_sections(cfg, "train", needed=("model",), unused=("teacher", "student", "terms", "kd"))
    with runs.start_run(cfg, "train", cfg.model.name, args.run_dir, args.resume) as run:
        model = runs.build_model(cfg.model.name, cfg.model.options, run.info, run.device, cfg.channels_last)
        optimizer, scheduler = runs.build_optimization(cfg, model.parameters())
        runner = distributed.wrap(model, run.device)
        if cfg.compile:
            runner = torch.compile(runner)
        method = SupervisedMethod(runner, optimizer, scheduler, precision=Precision(cfg.amp, run.device),
                                  grad_clip=cfg.grad_clip)
        history = runs.fit_run(run, method, {"model": model_record(cfg.model.name, cfg.model.options, run.info)})
    return finished(run, history)

