"""Born-Again Networks (Furlanello, Lipton, Tschannen, Itti and Anandkumar, ICML 2018).

Generation 0 is trained with cross-entropy (or taken from a given checkpoint); generation
g + 1, the same architecture freshly initialised, learns from generation g's predictions.
The basic BAN objective is the teacher's output distribution as the only target (KD at
T = 1 with no label term); the label term can be added. Any featkd feature terms can be
added too, since each born-again generation is a plain ``featkd.Distiller`` run.

:func:`train_generations` runs the N generations one after the other, each in its own run
directory ``gen<g>`` inside the parent run directory, and evaluates every generation and
the ensembles of generations (averaged softmax):

* ``bane``: generations 1..g (the born-again ones; the paper's BAN ensemble), from g = 2;
* ``ensemble_all``: generations 0..g, from g = 1.

With ``resume=True`` completed generations are loaded and skipped, an interrupted one is
resumed from its ``last.pt`` and the rest are trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from dataclasses import dataclass

from featkd import checkpoint as ckpt
from featkd.batches import IMAGES
from featkd.engine import Method, evaluate, fit, seed_everything
from featkd.models.ensemble import ProbabilityAverage
from featkd.strategies.registry import Strategy, register

SUMMARY = "born_again.json"


class WithEnsembles:
    """A Method that also evaluates the given ensembles; everything else is the wrapped Method's."""

    def __init__(self, method: Method, ensembles: dict[str, nn.Module]):
        self.method, self.ensembles = method, ensembles

    def __getattr__(self, name: str) -> Any:  # precision, optimizer, ... of the wrapped Method
        return getattr(self.method, name)

    def train_step(self, x, y, step, indices=None):
        return self.method.train_step(x, y, step, indices)

    def eval_models(self) -> dict[str, nn.Module]:
        return {**self.method.eval_models(), **self.ensembles}

    def on_epoch_end(self, epoch):
        self.method.on_epoch_end(epoch)

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state):
        self.method.load_state_dict(state)


def _generation_records(student_record: dict | None, ensembles: dict[str, nn.Module], models: list[nn.Module],
                        records: list[dict | None]) -> dict[str, dict] | None:
    """A generation's checkpoint records: its student's, and each ensemble's from its members' records
    (none for an ensemble with a member whose record is unknown)."""
    if student_record is None:
        return None
    record_of = {id(model): record for model, record in zip(models, records)}
    info = {"student": student_record}
    for name, ensemble in ensembles.items():
        members = [record_of[id(member)] for member in ensemble.members]
        if all(member is not None for member in members):
            info[name] = ckpt.ensemble_record(members)
    return info


def generation_ensembles(models: list[nn.Module]) -> dict[str, nn.Module]:
    """The ensembles evaluated with the newest of ``models`` (generations 0..g)."""
    ensembles = {}
    if len(models) >= 3:
        ensembles["bane"] = ProbabilityAverage(models[1:])
    if len(models) >= 2:
        ensembles["ensemble_all"] = ProbabilityAverage(models)
    return ensembles


def _finished_epochs(gen_dir: Path) -> int:
    last = gen_dir / ckpt.LAST
    return ckpt.load_checkpoint(last)["epoch"] if last.is_file() else 0


def train_generations(
    make_model: Callable[[], nn.Module],
    make_method: Callable[[int, nn.Module, nn.Module | None], Method],
    train_loader,
    test_loader,
    run_dir: str | Path,
    generations: int,
    epochs: int,
    *,
    seed: int = 0,
    resume: bool = False,
    generation0: nn.Module | None = None,
    generation0_info: dict | None = None,
    config: dict | None = None,
    model_info: dict | None = None,
    log=print,
    **fit_options,
) -> list[dict[str, Any]]:
    """Train generation 0 (unless ``generation0`` is given) and ``generations`` born-again generations.

    ``make_model()`` builds a fresh network (called after seeding with ``seed + g``);
    ``make_method(g, student, teacher)`` builds generation g's Method (``teacher`` is None for
    g = 0); its eval models must name the network ``student``. Returns one summary row per
    generation (final accuracies of the network and of the ensembles), also written to
    ``run_dir/born_again.json``. ``model_info``: the record of each generation's network
    (:func:`featkd.checkpoint.model_record`), ``generation0_info`` that of a given ``generation0``; with
    them a generation's checkpoint also records its ensembles, so that ``featkd eval`` rebuilds them.
    """
    if generations < 1:
        raise ValueError(f"born-again needs at least 1 generation after generation 0, got {generations}.")
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"cannot resume: {str(run_dir)!r} does not exist; start it without --resume.")
    elif ckpt.holds_results(run_dir):
        raise ckpt.RunDirectoryExistsError(
            f"run directory {str(run_dir)!r} already exists and is not empty; pass --resume to continue its "
            "generations, or choose a new --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_run_info(run_dir, config)

    models: list[nn.Module] = []
    records: list[dict | None] = []  # each generation's model record, for the ensembles' records
    summary: list[dict[str, Any]] = []
    for g in range(generations + 1):
        if g == 0 and generation0 is not None:
            generation0.eval().requires_grad_(False)
            models.append(generation0)
            records.append(generation0_info)
            scores = evaluate(generation0, test_loader, device=fit_options.get("device"),
                              batch_format=fit_options.get("batch_format", IMAGES))
            summary.append({"generation": 0, "source": "given checkpoint", "student/acc1": scores["acc1"]})
            continue
        seed_everything(seed + g)
        student = make_model()
        gen_dir = run_dir / f"gen{g}"
        done = _finished_epochs(gen_dir) if resume else 0
        if done >= epochs:
            student.load_state_dict(ckpt.load_checkpoint(gen_dir / ckpt.LAST)["models"]["student"]["state_dict"])
            final = ckpt.read_metrics(gen_dir)[-1]
            log(f"generation {g}: complete in {gen_dir}, skipped")
        else:
            log(f"generation {g}: {'resuming' if done else 'training'} in {gen_dir}")
            teacher = models[-1] if models else None
            ensembles = generation_ensembles(models + [student])
            method = WithEnsembles(make_method(g, student, teacher), ensembles)
            info = _generation_records(model_info, ensembles, models + [student], records + [model_info])
            final = fit(method, train_loader, test_loader, gen_dir, epochs, resume=done > 0,
                        config=config, model_info=info, log=log, **fit_options)[-1]
        student.eval().requires_grad_(False)
        models.append(student)
        records.append(model_info)
        summary.append({"generation": g, **{key: value for key, value in final.items() if key.endswith("/acc1")}})
        ckpt.atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class BornAgainConfig:
    """The ``born_again:`` section: how many generations follow generation 0, and where generation 0 comes from.

    The network is the top-level ``model``. Each born-again generation is a Distiller run with
    the previous generation as its teacher and the top-level ``kd`` (BAN: ``{loss: kd, weight: 1,
    options: {T: 1}}``), ``ce_weight`` (0: the teacher's output is the only target) and ``terms``.
    """

    generations: int = 2
    teacher_checkpoint: str | None = None


def _check(cfg, ban: BornAgainConfig) -> None:
    from featkd.config import ConfigError, RelativeWeightConfig

    if cfg.model is None:
        raise ConfigError("featkd born-again needs model.name: the architecture of every generation")
    if cfg.kd is None and not cfg.terms:
        raise ConfigError("featkd born-again needs kd (e.g. {loss: kd, weight: 1, options: {T: 1}}) or terms: "
                          "what each generation learns from the previous one")
    relative = [f"terms.{i}.weight" for i, term in enumerate(cfg.terms) if isinstance(term.weight, RelativeWeightConfig)]
    if cfg.kd is not None and isinstance(cfg.kd.weight, RelativeWeightConfig):
        relative.insert(0, "kd.weight")
    if relative:
        # each generation has another teacher, so one weight resolved on the first batch would hold for one only
        raise ConfigError(f"featkd born-again takes absolute weights, and {', '.join(relative)} is relative to the "
                          "cross-entropy; give a number (featkd distill resolves relative weights and records the "
                          "number in its run's config.yaml)")


def _train(run, cfg, ban: BornAgainConfig) -> list[dict]:
    """``featkd born-again``: generation 0 (trained, or ``teacher_checkpoint``) and the generations after it;
    prints and returns one summary row per generation."""
    from featkd import distributed, runs
    from featkd.checkpoint import model_record
    from featkd.engine import DistillMethod, Precision, SupervisedMethod
    from featkd.teachers import load_teacher

    precision = Precision(cfg.amp, run.device)

    def make_model():
        return runs.build_model(cfg.model.name, cfg.model.options, run.info, run.device, cfg.channels_last)

    def make_method(generation, student, teacher):
        if teacher is None:
            optimizer, scheduler = runs.build_optimization(cfg, student.parameters())
            return SupervisedMethod(student, optimizer, scheduler, precision=precision, grad_clip=cfg.grad_clip,
                                    name="student", batch_format=run.batch_format)
        distiller = runs.build_distiller(cfg, teacher, student, batch_format=run.batch_format).setup(run.example())
        optimizer, scheduler = runs.build_optimization(cfg, distiller.trainable_parameters())
        return DistillMethod(distiller, optimizer, scheduler, precision=precision, grad_clip=cfg.grad_clip,
                             steps_per_epoch=len(run.train_loader))

    generation0 = generation0_info = None
    if ban.teacher_checkpoint:
        generation0, generation0_info = load_teacher(ban.teacher_checkpoint, run.device, run.info)
    try:
        summary = train_generations(make_model, make_method, run.train_loader, run.test_loader, run.run_dir,
                                    ban.generations, cfg.epochs, seed=cfg.seed, resume=run.resume,
                                    generation0=generation0, generation0_info=generation0_info,
                                    config=run.saved_config,
                                    model_info=model_record(cfg.model.name, cfg.model.options, run.info),
                                    device=run.device, channels_last=cfg.channels_last,
                                    batch_format=run.batch_format)
    finally:
        distributed.shutdown()
    for row in summary:
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return summary


# a resumed run skips the generations already complete, so their number may change
register(Strategy("born-again", "born_again", BornAgainConfig, _train, lambda cfg, ban: cfg.model.name, _check,
                  resume_changeable=("born_again.generations",), results=("gen*/", "born_again.json")))
