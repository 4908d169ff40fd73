"""Paper protocols: AT Table 1, NST kernels, Hinton's omitted class — and their result tables.

Each protocol is a list of student configurations (``Member``s of a :mod:`featkd.sweep`) per
teacher/student pair, run at one of three budgets:

* ``full``  — the papers' schedule (200 epochs, batch 128, SGD 0.1, ×0.2 at 60/120/160); for a GPU;
* ``short`` — the same protocol with fewer epochs (minutes on a GPU);
* ``cpu``   — small enough for a 2-core CPU: a class-balanced subset, a few epochs, 2 seeds,
  the smaller pairs.

The dataset is CIFAR-10 when a path is given, Fashion-MNIST otherwise; every table says which,
and the published (CIFAR-10) column is compared through deltas against the student baseline,
never as absolute numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featkd.checkpoint import model_record
from featkd.stats import Summary
from featkd.models import default_distill_layers, pre_relu_layer

# ----------------------------------------------------------------------------- tables


@dataclass
class Cell:
    """One row of a result table: a method on a pair, our per-seed values and the published one."""

    group: str  # e.g. "WRN-16-1 ← WRN-16-2"
    method: str  # e.g. "AT", "KD", "student"
    values: list[float]  # ours, per seed (error % or accuracy %)
    published: float | None = None  # the paper's number (on the paper's dataset), None if not verified


def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def results_table(cells: Sequence[Cell], *, baseline: str = "student", metric: str = "error %",
                  ours_dataset: str, published_dataset: str = "CIFAR-10") -> str:
    """A Markdown table: ours (mean ± std, median, n) and Δ vs the baseline row of the same group,
    beside the published value and its Δ. Deltas, not absolute values, are comparable across datasets.
    """
    baselines = {c.group: Summary.of(c.values).mean for c in cells if c.method == baseline and c.values}
    published_baselines = {c.group: c.published for c in cells if c.method == baseline}
    header = (f"| pair | method | ours: {metric} mean ± std ({ours_dataset}) | ours: median | seeds "
              f"| ours: Δ vs {baseline} | paper: {metric} ({published_dataset}) | paper: Δ vs {baseline} |")
    lines = [header, "|" + "---|" * 8]
    for c in cells:
        if c.values:
            s = Summary.of(c.values)
            ours = f"{s.mean:.2f} ± {s.std:.2f}"
            median, n = f"{s.median:.2f}", str(s.n)
            delta = s.mean - baselines[c.group] if c.group in baselines and c.method != baseline else None
        else:
            ours, median, n, delta = "not run", "—", "0", None
        base_pub = published_baselines.get(c.group)
        pub_delta = (c.published - base_pub
                     if c.published is not None and base_pub is not None and c.method != baseline else None)
        lines.append(f"| {c.group} | {c.method} | {ours} | {median} | {n} | {_fmt(delta, signed=True)} "
                     f"| {_fmt(c.published)} | {_fmt(pub_delta, signed=True)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- omitted class (Hinton et al. 2015)


def shift_logit(logits: torch.Tensor, cls: int, shift: float) -> torch.Tensor:
    """``logits`` with ``shift`` added to column ``cls`` — the effect of raising that class's output bias."""
    shifted = logits.clone()
    shifted[:, cls] += shift
    return shifted


@dataclass(frozen=True)
class BiasChoice:
    shift: float
    heldout_accuracy: float  # % on the held-out split at that shift
    curve: tuple[tuple[float, float], ...] = field(repr=False)  # (shift, held-out accuracy %) for every candidate


def choose_bias_shift(logits: torch.Tensor, labels: torch.Tensor, cls: int,
                      candidates: Sequence[float] | None = None) -> BiasChoice:
    """The bias shift for class ``cls`` that maximises accuracy on held-out ``(logits, labels)``.

    Hinton et al. (2015) raised the omitted class's bias by a constant (3.5 on MNIST) without saying
    how it was picked; here it is the candidate (default 0, 0.25, ..., 10) with the highest accuracy
    on a held-out split that contains every class (ties: the smallest shift). The test set is never used.
    """
    candidates = list(np.arange(0.0, 10.0001, 0.25)) if candidates is None else list(candidates)
    if not candidates:
        raise ValueError("choose_bias_shift needs at least one candidate shift")
    curve = []
    for shift in candidates:
        predicted = shift_logit(logits, cls, float(shift)).argmax(1)
        curve.append((float(shift), 100.0 * (predicted == labels).float().mean().item()))
    best = max(curve, key=lambda point: (point[1], -point[0]))
    return BiasChoice(best[0], best[1], tuple(curve))


def apply_bias_shift(model: torch.nn.Module, cls: int, shift: float) -> torch.nn.Linear:
    """Add ``shift`` to the bias of output ``cls`` of the model's last ``nn.Linear`` (in place); return that layer."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError(f"{type(model).__name__} has no final nn.Linear with a bias to shift")
    head = linears[-1]
    with torch.no_grad():
        head.bias[cls] += shift
    return head


@dataclass(frozen=True)
class ClassErrors:
    total_errors: int
    total: int
    class_errors: int
    class_total: int

    @property
    def class_accuracy(self) -> float:
        return 100.0 * (self.class_total - self.class_errors) / max(self.class_total, 1)


def class_errors(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> ClassErrors:
    """Errors overall and on class ``cls`` (Hinton et al. report both)."""
    wrong = logits.argmax(1) != labels
    in_class = labels == cls
    return ClassErrors(int(wrong.sum()), int(labels.numel()), int((wrong & in_class).sum()), int(in_class.sum()))


# ============================================================================= protocols and runner

PAPER_SCHEDULE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, gamma=0.2, milestone_fractions=(0.3, 0.6, 0.8))


@dataclass(frozen=True)
class Budget:
    """How much of a protocol to run. The lr decays where the official AT code decays it — at the start
    of (1-indexed) epochs 60/120/160 of 200 — scaled to the budget's epochs, with momentum restarts."""

    name: str
    epochs: int
    teacher_epochs: int
    seeds: tuple[int, ...]
    batch_size: int = 128
    train_limit: int | None = None  # class-balanced subset of the training split (None: all of it)
    test_limit: int | None = None
    pairs: int | None = None  # run only the first `pairs` pairs of the protocol (None: all)
    methods: tuple[str, ...] | None = None  # run only these methods (None: all)

    def milestones(self, epochs: int) -> list[int]:
        from featkd.engine import decay_milestones

        return decay_milestones(epochs, PAPER_SCHEDULE["milestone_fractions"])

    def describe(self) -> str:
        subset = f"train subset {self.train_limit}" if self.train_limit else "full train split"
        test = f"test subset {self.test_limit}" if self.test_limit else "full test split"
        return (f"budget `{self.name}`: students {self.epochs} epochs ({self.stages(self.epochs)}), teachers "
                f"{self.teacher_epochs} epochs ({self.stages(self.teacher_epochs)}), batch {self.batch_size} (the "
                f"last, smaller one kept), SGD lr "
                f"{PAPER_SCHEDULE['lr']} momentum 0.9 (restarted at each decay) wd 5e-4, pad-4 reflection crop + flip, "
                f"WRN BN weights ~ U[0, 1), {subset}, {test}, seeds {list(self.seeds)}")

    def stages(self, epochs: int) -> str:
        milestones = self.milestones(epochs)
        if not milestones:
            return "constant lr"
        lengths = "/".join(str(b - a) for a, b in zip([0, *milestones], [*milestones, epochs]))
        return f"lr ×0.2 at the start of epochs {'/'.join(str(m + 1) for m in milestones)}: stages of {lengths}"


@dataclass(frozen=True)
class Pair:
    student: str
    teacher: str
    published: Mapping[str, float] = field(default_factory=dict)  # method -> published number

    @property
    def label(self) -> str:
        return f"{pretty_model(self.student)} ← {pretty_model(self.teacher)}"


@dataclass(frozen=True)
class Recipe:
    """One column of a table: how a student is trained. ``distill(student_layers, teacher_layers)`` gives
    the :class:`featkd.Distiller` keyword arguments, or is None for the student alone (cross-entropy);
    ``layers(model)`` gives those layer names for each model."""

    name: str
    distill: Callable[[list[str], list[str]], dict] | None
    layers: Callable[[nn.Module], list[str]] = default_distill_layers


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    pairs: tuple[Pair, ...]
    recipes: tuple[Recipe, ...]
    budgets: Mapping[str, Budget]
    published_note: str


def pretty_model(name: str) -> str:
    if name.startswith("wrn"):
        depth, width = name[3:].split("_")
        return f"WRN-{depth}-{width}"
    return {"nin": "NIN-wide", "nin_thin": "NIN-thin"}.get(name, name)


def _at_terms(s_layers, t_layers):
    from featkd.distiller import Term

    # Official AT code: beta = 1e3 times the mean squared difference of the normalised maps, per group.
    return [Term(t, s, loss="at", weight=1e3, name=f"at:{s}") for s, t in zip(s_layers, t_layers)]


def _fact_terms(s_layers, t_layers):
    from featkd.distiller import Term

    # F-ActT (AT paper's full-activation baseline): an L2 hint between the activations at the same
    # layers, through a 1x1-conv regressor where channel counts differ (FitNets-style). The AT paper
    # gives no weight for it; RepDistiller's FitNet weight (100) diverged within two steps at lr 0.1 on
    # the unnormalised group outputs, so the weight is 1.
    return [Term(t, s, loss="hint", weight=1.0, name=f"hint:{s}") for s, t in zip(s_layers, t_layers)]


def nst_layers(model: nn.Module) -> list[str]:
    """The official NST code's placement of the last map — after its BN, before its ReLU (featkd's WRN:
    ``bn``) — in place of the last group's output; ``@all`` adds the earlier groups' outputs."""
    return [*default_distill_layers(model)[:-1], pre_relu_layer(model)]


def _nst_terms(kernel, which):
    def terms(s_layers, t_layers):
        from featkd.distiller import Term

        pairs = list(zip(s_layers, t_layers))
        pairs = pairs[-1:] if which == "last" else pairs
        # Official NST: weight 50 on the (1/C²-normalised) MMD, applied once, to the last map (`@last`).
        return [Term(t, s, loss="nst", weight=50.0, name=f"nst-{kernel}:{s}", options={"kernel": kernel})
                for s, t in pairs]
    return terms


# Small enough for a 2-core CPU shared with other jobs; the same data and teacher settings in
# every protocol so that the cached teachers are shared between tables.
CPU_BUDGET = Budget("cpu", 4, 6, (0, 1), batch_size=64, train_limit=2000, test_limit=1000, pairs=1)

AT_KD = {"loss": "kd", "weight": 0.9, "T": 4}  # AT code: (1-α)·CE + α·T²·KL, α = 0.9, T = 4
NST_KD = {"loss": "kd", "weight": 1.0, "T": 4}  # NST code: CE + 16·KL at T=4; featkd's kd_loss has the T² = 16 built in


def _recipe(name, terms=None, kd=None, ce_weight=1.0, layers=default_distill_layers):
    if terms is None and kd is None:
        return Recipe(name, None)
    return Recipe(name, lambda s, t: dict(terms=terms(s, t) if terms else [], kd=kd, ce_weight=ce_weight), layers)


AT_TABLE1 = Protocol(
    name="at-table1",
    title="AT paper, Table 1: activation-based attention transfer on CIFAR-10 (error %)",
    pairs=(
        Pair("wrn16_1", "wrn16_2", {"student": 8.77, "AT": 7.93, "teacher": 6.31}),
        Pair("wrn16_1", "wrn40_1", {"student": 8.77, "AT": 8.25, "KD": 8.39, "teacher": 6.58}),
        Pair("wrn16_2", "wrn40_2", {"student": 6.31, "AT": 5.85, "KD": 6.08, "teacher": 5.23}),
        Pair("nin_thin", "nin", {}),
    ),
    recipes=(
        _recipe("student"),
        _recipe("AT", _at_terms),
        _recipe("F-ActT", _fact_terms),
        _recipe("KD", kd=AT_KD, ce_weight=0.1),
        _recipe("AT+KD", _at_terms, kd=AT_KD, ce_weight=0.1),
    ),
    budgets={
        "full": Budget("full", 200, 200, (0, 1, 2, 3, 4)),
        "short": Budget("short", 30, 30, (0, 1, 2)),
        "cpu": CPU_BUDGET,
    },
    published_note="Zagoruyko & Komodakis 2017, Table 1 (CIFAR-10, median of 5 runs); only the cells checked "
                   "against the paper are filled, the others are left blank.",
)

KERNELS = ("linear", "poly", "gaussian")

NST_KERNELS = Protocol(
    name="nst-kernels",
    title="NST kernels (linear, polynomial d=2 c=0, Gaussian) on the last group and on all groups, alone and with KD",
    pairs=AT_TABLE1.pairs,
    recipes=(
        _recipe("student"),
        _recipe("KD", kd=NST_KD),
        *(_recipe(f"NST-{k}@last", _nst_terms(k, "last"), layers=nst_layers) for k in KERNELS),
        *(_recipe(f"NST-{k}@last+KD", _nst_terms(k, "last"), kd=NST_KD, layers=nst_layers) for k in KERNELS),
        *(_recipe(f"NST-{k}@all", _nst_terms(k, "all"), layers=nst_layers) for k in KERNELS),
        *(_recipe(f"NST-{k}@all+KD", _nst_terms(k, "all"), kd=NST_KD, layers=nst_layers) for k in KERNELS),
    ),
    budgets={
        "full": Budget("full", 200, 200, (0, 1, 2, 3, 4)),
        "short": Budget("short", 30, 30, (0, 1, 2)),
        "cpu": dataclasses.replace(CPU_BUDGET, methods=("student", "KD", "NST-linear@last", "NST-poly@last", "NST-gaussian@last",
                               "NST-poly@last+KD")),
    },
    published_note="The student and teacher cells are the AT paper's (CIFAR-10); no CIFAR-10 numbers are published "
                   "for the NST cells. For context only (other datasets): the official "
                   "NST re-implementation on ImageNet (ResNet-101 teacher) gives Inception-BN top-1/top-5 error "
                   "25.74/8.07 → NST-poly 24.81/7.55 → NST-poly+KD 24.34/7.11; RepDistiller on CIFAR-100, "
                   "WRN-40-2 → WRN-16-2, top-1 %: student 73.26, KD 74.92, AT 74.08, NST 73.68, FitNet 73.58, FSP 72.91.",
)

PROTOCOLS = {p.name: p for p in (AT_TABLE1, NST_KERNELS)}


# ----------------------------------------------------------------------------- environment


def hardware() -> str:
    """The device the numbers were measured on, in words."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


@dataclass(frozen=True)
class DataSpec:
    """Which dataset a protocol runs on: CIFAR-10 when given a path, Fashion-MNIST otherwise."""

    name: str = "fashion_mnist"
    root: str | None = None

    @property
    def label(self) -> str:
        return {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "synthetic": "synthetic"}.get(self.name, self.name)

    def load(self, split: str, limit: int | None, **options):
        from featkd.data import load_dataset

        return load_dataset(self.name, root=self.root, split=split, limit=limit, seed=0, **options)


# ----------------------------------------------------------------------------- teachers (cached, never overwritten)


def protocol_model_options(name: str) -> dict:
    """Constructor options that make a protocol's model the reference code's: WRN BN weights ~ U[0, 1)."""
    return {"bn_init": "uniform"} if name.startswith("wrn") else {}


def _schedule(model_params, epochs, budget):
    from featkd.engine import build_optimizer, build_scheduler

    optimizer = build_optimizer(model_params, lr=PAPER_SCHEDULE["lr"], momentum=PAPER_SCHEDULE["momentum"],
                                weight_decay=PAPER_SCHEDULE["weight_decay"])
    # The official AT code builds a new optimiser at each decay: its momentum restarts there.
    scheduler = build_scheduler(optimizer, epochs=epochs, milestones=budget.milestones(epochs),
                                gamma=PAPER_SCHEDULE["gamma"], restart_momentum_at_milestones=True)
    return optimizer, scheduler


def _finished(run_dir: Path, epochs: int) -> bool:
    from featkd import checkpoint as ckpt

    last = run_dir / ckpt.LAST
    return last.is_file() and ckpt.load_checkpoint(last)["epoch"] >= epochs


_UNFINISHED_FIRST_EPOCH = {"config.yaml", "environment.json"}


def _fit_or_resume(method, train_loader, test_loader, run_dir: Path, epochs: int, *, log, **options) -> list[dict]:
    """Train into ``run_dir``, resume it if interrupted, or return the stored history if it is finished.

    Two commands sharing a ``--run-dir`` (the AT and NST tables share their teachers) must not train
    the same run at once: a lock file marks a run in progress.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir.parent / f".{run_dir.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        from featkd import checkpoint as ckpt

        raise ckpt.RunDirectoryExistsError(
            f"{run_dir} is being trained by another process ({lock} exists); wait for it to finish, or delete "
            "the lock file if that process is gone") from None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return _fit_or_resume_unlocked(method, train_loader, test_loader, run_dir, epochs, log=log, **options)
    finally:
        lock.unlink(missing_ok=True)


def _fit_or_resume_unlocked(method, train_loader, test_loader, run_dir: Path, epochs: int, *, log, **options):
    from featkd import checkpoint as ckpt
    from featkd.engine import fit

    last = run_dir / ckpt.LAST
    if not last.is_file() and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= _UNFINISHED_FIRST_EPOCH:
        # Interrupted before its first epoch ended: only the files fit writes at the start exist, no
        # result to keep. Start it again.
        for name in _UNFINISHED_FIRST_EPOCH:
            (run_dir / name).unlink(missing_ok=True)
    if last.is_file():
        state = ckpt.load_checkpoint(last)
        if state["epoch"] >= epochs:
            method.load_state_dict(state["method"])
            log(f"reusing finished run {run_dir}")
            return state["history"]
        return fit(method, train_loader, test_loader, run_dir, epochs, resume=True, log=log, **options)
    return fit(method, train_loader, test_loader, run_dir, epochs, log=log, **options)


def _check_cached_config(run_dir: Path, config: Mapping) -> None:
    """A cached run is reused only if it was made with the same settings; otherwise say so (never overwrite)."""
    import yaml

    from featkd import checkpoint as ckpt

    stored = run_dir / "config.yaml"
    if stored.is_file():
        old = yaml.safe_load(stored.read_text()) or {}
        # A setting the stored run does not record was not how it was made (it predates the setting).
        changed = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if changed:
            raise ckpt.RunDirectoryExistsError(
                f"{run_dir} holds a run made with other settings ({changed}: stored vs asked); "
                "it is kept as it is: choose another --run-dir")


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
    optimizer, scheduler = _schedule(model.parameters(), epochs, budget)
    method = SupervisedMethod(model, optimizer, scheduler, name="teacher")
    config = {"role": "teacher", "model": name, "model_options": options, "dataset": info.name, "epochs": epochs,
              "budget": budget.name, "train_examples": len(train_loader.dataset), "batch_size": train_loader.batch_size,
              "training": _training_record(train_loader, scheduler)}
    _check_cached_config(run_dir, config)
    history = _fit_or_resume(method, train_loader, test_loader, run_dir, epochs, log=log, device=device, config=config,
                             model_info={"teacher": model_record(name, options, info)})
    model.eval()
    return model, history[-1]["teacher/acc1"]


# ----------------------------------------------------------------------------- students (one sweep per pair)


def build_members(teacher: nn.Module, student_name: str, recipes: Sequence[Recipe], seeds: Sequence[int], info,
                  example_x: torch.Tensor, shared, budget: Budget, device, base_config: Mapping) -> list:
    """One sweep member per (recipe, seed): the student seeded by ``seed``, the paper's optimiser and schedule."""
    from featkd import checkpoint as ckpt
    from featkd import sweep
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
            config = {**base_config, "method": recipe.name, "seed": seed, "student": student_name}
            if recipe.distill is None:
                optimizer, scheduler = _schedule(student.parameters(), budget.epochs, budget)
                members.append(sweep.Member(name, SupervisedMethod(student, optimizer, scheduler), config, ckpt.rng_state()))
                continue
            distiller = Distiller(teacher, student, **recipe.distill(s_layers, t_layers)).setup(example_x[:2])
            optimizer, scheduler = _schedule(distiller.trainable_parameters(), budget.epochs, budget)
            members.append(sweep.make_member(name, distiller, optimizer, scheduler, shared=shared, config=config))
    return members


def run_students(teacher, student_name, recipes, budget, info, train_loader, test_loader, run_dir: Path, device,
                 base_config, log=print, eval_every: int = 1) -> dict[str, list[float]]:
    """Train every (recipe, seed) student against one shared teacher; return ``{recipe: [acc % per seed]}``."""
    from featkd import sweep

    shared = sweep.SharedTeacherOutputs()
    student_options = protocol_model_options(student_name)
    example_x = next(iter(test_loader))[0].to(device)
    members = build_members(teacher, student_name, recipes, budget.seeds, info, example_x, shared, budget, device,
                            base_config)
    method = sweep.SweepMethod(teacher, members, shared)
    config = {**base_config, "epochs": budget.epochs, "train_examples": len(train_loader.dataset),
              "members": [m.name for m in members],
              "training": _training_record(train_loader, members[0].method.scheduler)}
    _check_cached_config(run_dir, config)
    try:
        history = _fit_or_resume(method, train_loader, test_loader, run_dir, budget.epochs, device=device,
                                 config=config, log=lambda line: log(compact_summary(line)), eval_every=eval_every,
                                 model_info={m.name: model_record(student_name, student_options, info)
                                             for m in members})
    finally:
        method.close()
        for member in members:
            if member.distiller is not None:
                member.distiller.remove_hooks()
    if not (run_dir / sweep.MEMBERS_DIR).exists():
        sweep.write_member_runs(run_dir, members, history)
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


# ----------------------------------------------------------------------------- a whole table


@dataclass
class TableResult:
    markdown: str
    cells: list[Cell]
    accuracies: dict[str, dict[str, list[float]]]  # pair label -> recipe -> per-seed accuracy (%)
    teachers: dict[str, float]  # pair label -> teacher accuracy (%)
    wall_s: float


def protocol_train_loader(ds, budget: Budget, device):
    """The official AT code's training data: padded by 4 pixels by reflection, randomly cropped, flipped;
    every example once an epoch (the last, smaller batch is kept)."""
    from featkd.data import DeviceLoader

    return DeviceLoader(ds, budget.batch_size, shuffle=True, augment=True, device=device, seed=0, pad=4,
                        pad_mode="reflect", drop_last=False)


def run_protocol(protocol: Protocol, budget: Budget, data: DataSpec, run_root: Path, *, device="auto",
                 command: str | None = None, log=print) -> TableResult:
    """Run a table protocol: per pair, a cached teacher and one student sweep; return (and write) the table."""
    from featkd.data import DeviceLoader
    from featkd.engine import resolve_device

    started = time.perf_counter()
    device = resolve_device(device)
    train = data.load("train", budget.train_limit)
    test = data.load("test", budget.test_limit)
    info = train.info
    train_loader = protocol_train_loader(train, budget, device)
    test_loader = DeviceLoader(test, 256, shuffle=False, drop_last=False, device=device)
    pairs = protocol.pairs[: budget.pairs] if budget.pairs else protocol.pairs
    recipes = [r for r in protocol.recipes if budget.methods is None or r.name in budget.methods]
    accuracies, teachers, cells = {}, {}, []
    for pair in pairs:
        log(f"== {pair.label} on {data.label} ({budget.name} budget)")
        teacher_dir = run_root / "teachers" / f"{pair.teacher}-{data.name}-{budget.name}"
        teacher, teacher_acc = train_teacher(pair.teacher, info, train_loader, test_loader, teacher_dir,
                                             budget.teacher_epochs, budget, device, log)
        base = {"protocol": protocol.name, "pair": pair.label, "teacher": pair.teacher, "dataset": data.name,
                "budget": budget.name, "teacher_run": str(teacher_dir)}
        sweep_dir = run_root / protocol.name / f"{pair.student}-from-{pair.teacher}-{data.name}-{budget.name}"
        accs = run_students(teacher, pair.student, recipes, budget, info, train_loader, test_loader, sweep_dir,
                            device, base, log)
        accuracies[pair.label], teachers[pair.label] = accs, teacher_acc
        for recipe in recipes:
            cells.append(Cell(pair.label, recipe.name, [100.0 - a for a in accs[recipe.name]],
                              pair.published.get(recipe.name)))
        cells.append(Cell(pair.label, "teacher", [100.0 - teacher_acc], pair.published.get("teacher")))
    wall = time.perf_counter() - started
    markdown = render_report(protocol, budget, data, cells, wall, command)
    out = run_root / f"{protocol.name}-{budget.name}-{data.name}.md"
    _write_new(out, markdown)
    log(f"table written to {out}")
    return TableResult(markdown, cells, accuracies, teachers, wall)


def _write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, or to ``path`` with -2, -3 ... appended if that file exists (never overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, k = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    candidate.write_text(text)
    return candidate


def render_report(protocol: Protocol, budget: Budget, data: DataSpec, cells: Sequence[Cell], wall_s: float,
                  command: str | None) -> str:
    """The Markdown report of one table run: what was run, where, how long, and the table."""
    ours = data.label
    if data.name != "cifar10":
        ours += " (not CIFAR-10: compare the Δ columns, not absolute errors)"
    lines = [
        f"# {protocol.title}",
        "",
        f"- command: `{command or ' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- dataset (ours): {ours}",
        f"- {budget.describe()}",
        f"- hardware: {hardware()}",
        f"- wall time: {wall_s / 60:.1f} min",
        f"- torch {torch.__version__}",
        "",
        "Ours: error % at the last epoch (no test-set model selection), mean ± sample std over seeds, and the "
        "median; Δ = method − student on the same pair (negative = better than the student alone).",
        "",
        results_table(cells, ours_dataset=data.label),
        "",
        f"Published: {protocol.published_note}",
        "",
    ]
    return "\n".join(lines)


# ============================================================================= Hinton et al. 2015: the omitted class


@dataclass(frozen=True)
class OmittedBudget:
    """The omitted-class experiment's sizes (MLPs on flattened images, no augmentation)."""

    name: str
    epochs: int
    teacher_epochs: int
    seeds: tuple[int, ...]
    teacher_hidden: tuple[int, ...] = (1200, 1200)
    student_hidden: tuple[int, ...] = (800, 800)
    teacher_dropout: float = 0.2
    batch_size: int = 128
    train_limit: int | None = None
    test_limit: int | None = None
    heldout: int = 5000  # taken from the training split, class-balanced, used only to choose the bias shift
    omitted: int = 3
    T: float = 20.0
    lr: float = 0.05

    def describe(self) -> str:
        subset = f"train subset {self.train_limit}" if self.train_limit else "full train split"
        return (f"budget `{self.name}`: teacher MLP {'×'.join(map(str, self.teacher_hidden))} (dropout "
                f"{self.teacher_dropout}) {self.teacher_epochs} epochs, student MLP {'×'.join(map(str, self.student_hidden))} "
                f"{self.epochs} epochs, KD at T={self.T} (weight 0.9, CE 0.1), SGD lr {self.lr} momentum 0.9 wd 5e-4, "
                f"batch {self.batch_size}, {subset} minus {self.heldout} held-out examples, "
                f"{'test subset ' + str(self.test_limit) if self.test_limit else 'full test split'}, "
                f"omitted class {self.omitted}, seeds {list(self.seeds)}")


OMITTED_BUDGETS = {
    "full": OmittedBudget("full", 60, 60, (0, 1, 2)),
    "short": OmittedBudget("short", 15, 15, (0, 1)),
    "cpu": OmittedBudget("cpu", 5, 6, (0, 1), teacher_hidden=(400, 400), student_hidden=(200, 200),
                         train_limit=12000, heldout=2000),
}

HINTON_OMITTED = ("Hinton et al. 2015 (MNIST, 2×1200 teacher → 2×800 student, transfer set without any 3): "
                  "206 test errors, 133 of them on the 1010 test 3s; after raising the 3's bias by 3.5: "
                  "109 errors, 98.6% of the 3s correct.")


def split_heldout(ds, count: int, seed: int = 0):
    """(rest, heldout): ``count`` class-balanced examples held out, the rest kept; both in the original order."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=generator)
    classes = ds.info.num_classes
    per_class = [count // classes + (1 if c < count % classes else 0) for c in range(classes)]
    chosen = torch.cat([perm[ds.labels[perm] == c][: per_class[c]] for c in range(classes)])
    mask = torch.zeros(len(ds), dtype=torch.bool)
    mask[chosen] = True
    return ds.subset(torch.nonzero(~mask).flatten()), ds.subset(torch.nonzero(mask).flatten())


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``model`` over a loader, in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


@dataclass
class OmittedResult:
    markdown: str
    rows: list[dict]
    wall_s: float


def run_omitted_class(budget: OmittedBudget, data: DataSpec, run_root: Path, *, device="auto",
                      command: str | None = None, log=print) -> OmittedResult:
    """Hinton's omitted-class experiment: distil with class ``budget.omitted`` absent from the transfer set,
    then raise that class's output bias by the shift that maximises held-out accuracy."""
    from featkd import sweep
    from featkd.data import DeviceLoader, omit_classes
    from featkd.distiller import Distiller
    from featkd.engine import (SupervisedMethod, build_optimizer, build_scheduler, decay_milestones, resolve_device,
                               seed_everything)
    from featkd.models import create_model

    started = time.perf_counter()
    device = resolve_device(device)
    full_train = data.load("train", budget.train_limit)
    test = data.load("test", budget.test_limit)
    train, heldout = split_heldout(full_train, budget.heldout)
    info, cls = train.info, budget.omitted
    transfer = omit_classes(train, [cls])

    def loader(ds, shuffle):
        return DeviceLoader(ds, budget.batch_size if shuffle else 512, shuffle=shuffle, augment=False,
                            drop_last=shuffle, device=device, seed=0)

    def model(hidden, dropout=0.0):
        return create_model("mlp", num_classes=info.num_classes, in_channels=info.in_channels,
                            image_size=info.image_size, hidden=tuple(hidden), dropout=dropout).to(device)

    def schedule(params, epochs):
        optimizer = build_optimizer(params, lr=budget.lr, momentum=0.9, weight_decay=5e-4)
        milestones = decay_milestones(epochs, PAPER_SCHEDULE["milestone_fractions"])
        return optimizer, build_scheduler(optimizer, epochs=epochs, milestones=milestones, gamma=0.2)

    test_loader, heldout_loader = loader(test, False), loader(heldout, False)
    sizes = "x".join(map(str, budget.teacher_hidden))
    teacher_dir = run_root / "teachers" / f"mlp{sizes}-{data.name}-omitted-{budget.name}"
    seed_everything(0)
    teacher = model(budget.teacher_hidden, budget.teacher_dropout)
    config = {"role": "teacher", "model": f"mlp {sizes}", "dataset": info.name, "epochs": budget.teacher_epochs,
              "budget": budget.name, "train_examples": len(train)}
    _check_cached_config(teacher_dir, config)
    _fit_or_resume(SupervisedMethod(teacher, *schedule(teacher.parameters(), budget.teacher_epochs), name="teacher"),
                   loader(train, True), test_loader, teacher_dir, budget.teacher_epochs, log=log, device=device,
                   config=config)
    teacher.eval()

    rows = [{"model": f"teacher (MLP {sizes.replace('x', '×')}, all classes)", "seed": 0,
             "test": class_errors(*predict(teacher, test_loader), cls)}]
    for transfer_name, transfer_set in (("full transfer set", train), (f"class {cls} omitted", transfer)):
        shared = sweep.SharedTeacherOutputs()
        members = []
        for seed in budget.seeds:
            seed_everything(seed)
            student = model(budget.student_hidden)
            distiller = Distiller(teacher, student, kd={"loss": "kd", "weight": 0.9, "T": budget.T},
                                  ce_weight=0.1).setup(next(iter(test_loader))[0][:2])
            members.append(sweep.make_member(f"s{seed}", distiller, *schedule(distiller.trainable_parameters(), budget.epochs),
                                             shared=shared, config={"transfer": transfer_name, "seed": seed}))
        method = sweep.SweepMethod(teacher, members, shared)
        run_dir = run_root / "omitted-class" / f"{data.name}-{budget.name}-{'omitted' if transfer_set is transfer else 'full'}"
        run_config = {"protocol": "omitted-class", "transfer": transfer_name, "dataset": info.name,
                      "budget": budget.name, "epochs": budget.epochs, "train_examples": len(transfer_set)}
        _check_cached_config(run_dir, run_config)
        try:
            _fit_or_resume(method, loader(transfer_set, True), test_loader, run_dir, budget.epochs, device=device,
                           config=run_config, log=lambda line: log(compact_summary(line)))
        finally:
            method.close()
        for member in members:
            row = {"model": f"student (MLP {'×'.join(map(str, budget.student_hidden))}), {transfer_name}",
                   "seed": member.config["seed"], "test": class_errors(*predict(member.student, test_loader), cls)}
            if transfer_set is transfer:
                choice = choose_bias_shift(*predict(member.student, heldout_loader), cls)
                apply_bias_shift(member.student, cls, choice.shift)
                row.update(shift=choice.shift, heldout_acc=choice.heldout_accuracy,
                           shifted=class_errors(*predict(member.student, test_loader), cls))
                apply_bias_shift(member.student, cls, -choice.shift)
            rows.append(row)
    wall = time.perf_counter() - started
    markdown = render_omitted(rows, budget, data, wall, command, len(heldout))
    out = _write_new(run_root / f"omitted-class-{budget.name}-{data.name}.md", markdown)
    log(f"report written to {out}")
    return OmittedResult(markdown, rows, wall)


def render_omitted(rows, budget: OmittedBudget, data: DataSpec, wall_s: float, command: str | None,
                   heldout_count: int) -> str:
    cls = budget.omitted
    lines = [
        f"# Hinton et al. 2015: distillation with class {cls} omitted from the transfer set",
        "",
        f"- command: `{command or ' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- dataset (ours): {data.label}" + ("" if data.name == "mnist" else " (the paper used MNIST)"),
        f"- {budget.describe()}",
        f"- bias correction: the omitted class's output bias is raised by the shift in 0, 0.25, ..., 10 that "
        f"maximises accuracy on {heldout_count} held-out training examples (all classes, never trained on); "
        f"the test set is not used to choose it",
        f"- hardware: {hardware()}",
        f"- wall time: {wall_s / 60:.1f} min",
        "",
        f"| model | seed | test errors | errors on class {cls} | class {cls} correct | bias shift | "
        f"after shift: test errors | after: errors on class {cls} | after: class {cls} correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["test"]
        cells = [row["model"], str(row["seed"]), f"{t.total_errors} / {t.total}", f"{t.class_errors} / {t.class_total}",
                 f"{t.class_accuracy:.1f}%"]
        if "shift" in row:
            s = row["shifted"]
            cells += [f"+{row['shift']:.2f}", f"{s.total_errors} / {s.total}", f"{s.class_errors} / {s.class_total}",
                      f"{s.class_accuracy:.1f}%"]
        else:
            cells += ["—"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["| published (MNIST, class 3) | — | 206 / 10000 | 133 / 1010 | 86.8% | +3.5 | 109 / 10000 | — | 98.6% |",
              "", f"Published: {HINTON_OMITTED}", ""]
    return "\n".join(lines)
