"""``featkd born-again``: Born-Again Networks, N generations in one command (see :mod:`featkd.strategies.born_again`).

    featkd born-again --config born_again --run-dir runs/ban born_again.generations=3
    featkd born-again --run-dir runs/ban --resume          # skips the generations already complete
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from featkd import distributed, runs
from featkd.checkpoint import model_record
from featkd.commands._common import add_run_arguments, reports_user_errors
from featkd.config import ConfigError
from featkd.strategies.born_again import train_generations
from featkd.teachers import load_teacher


@dataclass
class BornAgainConfig:
    """The ``born_again:`` section: how many generations follow generation 0, and where generation 0 comes from.

    The network is the top-level ``model``. Each born-again generation is a Distiller run with
    the previous generation as its teacher and the top-level ``kd`` (BAN: ``{loss: kd, weight: 1,
    options: {T: 1}}``), ``ce_weight`` (0: the teacher's output is the only target) and ``terms``.
    """

    generations: int = 2
    teacher_checkpoint: str | None = None


add_arguments = add_run_arguments  # --config, --run-dir, --resume, key=value overrides


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.engine import DistillMethod, Precision, SupervisedMethod

    cfg, ban, resolved = runs.load_strategy_config("born_again", BornAgainConfig, args.config, args.run_dir,
                                                   args.resume, args.overrides,
                                                   # a resumed run skips the generations already complete
                                                   runs.RESUME_CHANGEABLE + ("born_again.generations",))
    if cfg.model is None:
        raise ConfigError("featkd born-again needs model.name: the architecture of every generation")
    if cfg.kd is None and not cfg.terms:
        raise ConfigError("featkd born-again needs kd (e.g. {loss: kd, weight: 1, options: {T: 1}}) or terms: "
                          "what each generation learns from the previous one")
    with runs.start_run(cfg, "born-again", cfg.model.name, args.run_dir, args.resume, resolved) as run:
        precision = Precision(cfg.amp, run.device)
        example = next(iter(run.train_loader))[0][:2]

        def make_model():
            return runs.build_model(cfg.model.name, cfg.model.options, run.info, run.device, cfg.channels_last)

        def make_method(generation, student, teacher):
            if teacher is None:
                optimizer, scheduler = runs.build_optimization(cfg, student.parameters())
                return SupervisedMethod(student, optimizer, scheduler, precision=precision, grad_clip=cfg.grad_clip,
                                        name="student")
            distiller = runs.build_distiller(cfg, teacher, student).setup(example)
            optimizer, scheduler = runs.build_optimization(cfg, distiller.trainable_parameters())
            return DistillMethod(distiller, optimizer, scheduler, precision=precision, grad_clip=cfg.grad_clip,
                                 steps_per_epoch=len(run.train_loader))

        generation0 = generation0_info = None
        if ban.teacher_checkpoint:
            generation0, generation0_info = load_teacher(ban.teacher_checkpoint, run.device, run.info)
        try:
            summary = train_generations(make_model, make_method, run.train_loader, run.test_loader, run.run_dir,
                                        ban.generations, cfg.epochs, seed=cfg.seed, resume=args.resume,
                                        generation0=generation0, generation0_info=generation0_info, config=resolved,
                                        model_info=model_record(cfg.model.name, cfg.model.options, run.info),
                                        device=run.device, channels_last=cfg.channels_last)
        finally:
            distributed.shutdown()
    for row in summary:
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"finished: {run.run_dir} (gen*/, born_again.json)")
    return 0
