"""A protocol's students and teachers: a cached teacher, and every (recipe, seed) student in one sweep.

Both are trained with the paper's optimiser, schedule and initialisation (:mod:`featkd.repro.protocols`)
into cached run directories (:mod:`featkd.repro.cache`) whose configs record how they were trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from featkd.checkpoint import METRICS_JSONL, model_record
from featkd.repro.cache import check_cached_config, fit_or_resume
from featkd.repro.protocols import Budget, Recipe, paper_schedule, protocol_model_options


def _training_record(train_loader, scheduler) -> dict:
    """How a protocol run is trained beyond its sizes, stored with it so that a cached run made another way
    is not reused."""
    return {"pad": train_loader.pad, "pad_mode": train_loader.pad_mode, "drop_last": train_loader.drop_last,
            "milestones": scheduler.lr_lambdas[0].milestones,
            "restart_momentum_at_milestones": scheduler.restart_momentum_at_milestones}


def train_teacher(name: str, info, train_loader, test_loader, run_dir: Path, epochs: int, budget: Budget,
                  device, log=print) -> tuple[nn.Module, float]:
    """Train (or reuse) a teacher in ``run_dir``; return it in eval mode with its final test accuracy (%)."""
    from featkd.engine import SupervisedMethod, seed_everything
    from featkd.models import create_model

    seed_everything(0)
    options = protocol_model_options(name)
    model = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels, **options).to(device)
    optimizer, scheduler = paper_schedule(model.parameters(), epochs)
    method = SupervisedMethod(model, optimizer, scheduler, name="teacher")
    config = {"role": "teacher", "model": name, "model_options": options, "dataset": info.name, "epochs": epochs,
              "budget": budget.name, "train_examples": len(train_loader.dataset), "batch_size": train_loader.batch_size,
              "training": _training_record(train_loader, scheduler)}
    check_cached_config(run_dir, config)
    history = fit_or_resume(method, train_loader, test_loader, run_dir, epochs, log=log, device=device, config=config,
                            model_info={"teacher": model_record(name, options, info)})
    model.eval()
    return model, history[-1]["teacher/acc1"]


def build_members(teacher: nn.Module, student_name: str, recipes: Sequence[Recipe], seeds: Sequence[int], info,
                  first_batch, shared, budget: Budget, device, base_config: Mapping,
                  records: Mapping[str, dict] | None = None) -> list:
    """One sweep member per (recipe, seed): the student seeded by ``seed``, the paper's optimiser and schedule.

    ``first_batch`` is the first training batch: the dry run uses two of its images, and loss weights given
    relative to the cross-entropy are resolved on all of it (:func:`featkd.calibration.calibrate_weights`)
    before the member's first step; the member's config records its recipe (``records``) and those weights."""
    from featkd import checkpoint as ckpt
    from featkd import sweep
    from featkd.calibration import calibrate_weights
    from featkd.distiller import Distiller
    from featkd.engine import SupervisedMethod, seed_everything
    from featkd.models import create_model

    members = []
    for recipe in recipes:
        for seed in seeds:
            seed_everything(seed)
            student = create_model(student_name, num_classes=info.num_classes, in_channels=info.in_channels,
                                   **protocol_model_options(student_name)).to(device)
            s_layers, t_layers = recipe.layers(student), recipe.layers(teacher)
            name = f"{recipe.name}-s{seed}"
            config = {**base_config, "method": recipe.name, "seed": seed, "student": student_name,
                      "epochs": budget.epochs, **(records or {}).get(recipe.name, {})}
            if recipe.distill is None:
                optimizer, scheduler = paper_schedule(student.parameters(), budget.epochs)
                members.append(sweep.Member(name, SupervisedMethod(student, optimizer, scheduler), config, ckpt.rng_state()))
                continue
            distiller = Distiller(teacher, student, **recipe.distill(s_layers, t_layers)).setup(first_batch[0][:2])
            resolved = calibrate_weights(distiller, first_batch[0], first_batch[1])
            if resolved:
                config["resolved_weights"] = resolved
            optimizer, scheduler = paper_schedule(distiller.trainable_parameters(), budget.epochs)
            members.append(sweep.make_member(name, distiller, optimizer, scheduler, shared=shared, config=config))
    return members


def run_students(teacher, student_name, recipes, budget, info, train_loader, test_loader, run_dir: Path, device,
                 base_config, log=print, eval_every: int = 1, records: Mapping[str, dict] | None = None,
                 training: Mapping[str, dict] | None = None) -> dict[str, list[float]]:
    """Train every (recipe, seed) student against one shared teacher; return ``{recipe: [acc % per seed]}``.
    ``records``: each recipe's settings in full, stored in its members' configs. ``training``: what of each
    recipe decides its training, stored in the sweep's config, so that an interrupted sweep never resumes
    with other losses or weights under the same names (sweeps stored before it was recorded are checked
    through their members' configs once finished, :func:`featkd.repro.sweep_plan.check_stored_recipes`)."""
    from featkd import sweep

    shared = sweep.SharedTeacherOutputs()
    student_options = protocol_model_options(student_name)
    # the loader's batches are a function of (seed, epoch): reading the first one consumes no state
    train_loader.set_epoch(0)
    first_batch = [t.to(device) for t in next(iter(train_loader))[:2]]
    members = build_members(teacher, student_name, recipes, budget.seeds, info, first_batch, shared, budget, device,
                            base_config, records)
    method = sweep.SweepMethod(teacher, members, shared)
    config = {**base_config, "epochs": budget.epochs, "train_examples": len(train_loader.dataset),
              "members": [m.name for m in members],
              "training": _training_record(train_loader, members[0].method.scheduler),
              **({"recipes": dict(training)} if training else {})}
    # the teacher is the same file wherever the checkout or run directory now lies (a kept sweep continued elsewhere)
    check_cached_config(run_dir, config, recorded_since=("recipes", "teacher_sha256"),
                        files={"teacher": "teacher_sha256"})
    try:
        history = fit_or_resume(method, train_loader, test_loader, run_dir, budget.epochs, device=device,
                                config=config, results_only=True, log=lambda line: log(compact_summary(line)),
                                eval_every=eval_every,
                                model_info={m.name: model_record(student_name, student_options, info)
                                            for m in members})
    finally:
        method.close()
        for member in members:
            if member.distiller is not None:
                member.distiller.remove_hooks()
    # members written before (a finished sweep read back) are left as they are; a process killed while writing
    # them left some without metrics: those are written now
    unwritten = [m for m in members if not (run_dir / sweep.MEMBERS_DIR / m.name / METRICS_JSONL).is_file()]
    if unwritten:
        sweep.write_member_runs(run_dir, unwritten, history)
    accs: dict[str, list[float]] = {}
    for recipe in recipes:
        accs[recipe.name] = [history[-1][f"{recipe.name}-s{seed}/acc1"] for seed in budget.seeds]
    return accs


def compact_summary(line: str) -> str:
    """fit's epoch line reduced to the accuracies and the epoch time (a sweep's full line lists every loss)."""
    if not line.startswith("epoch "):
        return line
    parts = line.split("  ")
    kept = [p for p in parts[1:] if p.split(" ")[0].endswith("/acc1") or p.startswith("epoch_time_s")]
    return "  ".join([parts[0], *kept])
