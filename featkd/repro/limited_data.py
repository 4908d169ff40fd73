"""Hinton's limited-data regime: a teacher trained on the whole training split, students on a small part.

Hinton et al. (2015) trained a speech model on 3% of its data: hard targets reached 44.5% test
accuracy, the full model's soft targets 57.5%. Knowledge transfer is largest where the student's own
data is scarce and the teacher has seen much more; that is where feature transfer can be measured on
a 2-core CPU. Here the teacher (WRN-16-2) is trained once on all of Fashion-MNIST's training split;
the students (WRN-16-1) see a class-balanced ``fraction`` of it, and each method is compared with the
student alone *paired by seed* (:mod:`featkd.stats`).

Seed s draws everything random about a student: its class-balanced subset of the training split,
the batch order, the augmentation and its initial weights. Every method of seed s shares them, so the
comparison stays paired and its interval is about the method, not about one draw of the data. A seed's
students of one length train in one sweep (one teacher forward per batch), or in several where the
processes or the stored sweeps call for it (:mod:`featkd.repro.sweep_plan`).

A fixed class-balanced validation set (``validation_size`` training images, seed 0) is never in any
student's subset: settings are chosen on it (``evaluate_on="validation"``, what ``featkd tune`` does),
never on the test set. The students are built and trained by :func:`featkd.repro.students.run_students`
with the official AT code's optimiser, schedule, initialisation and data pipeline (SGD 0.1, momentum 0.9
restarted at each decay, wd 5e-4, ×0.2 at the start of the epochs 30/60/80% of the way through; WRN BN
weights uniform on [0, 1); pad 4 by reflection, random crop, flip; the last, smaller batch kept). The
recipes and their published weights are in ``featkd/configs/recipes/limited_data.yaml``
(:mod:`featkd.repro.recipes`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from featkd.provenance import environment_info, hardware, portable_path, trained_with
from featkd.shipped import ShippedTeacher
from featkd.teachers import file_sha256, load_teacher
from featkd.repro.cache import write_new
from featkd.repro.processes import map_in_processes
from featkd.repro.protocols import Budget, pretty_model, protocol_device
from featkd.repro.recipes import RecipeSpec, load_recipes
from featkd.repro.limited_data_report import TUNED, render_report
from featkd.repro.report import DataSpec
from featkd.repro.students import run_students
from featkd.repro.sweep_plan import PlannedSweep, SweepGroup, describe_plan, plan_sweeps, stored_seconds

STUDENT, TEACHER = "wrn16_1", "wrn16_2"
RECIPES: dict[str, RecipeSpec] = load_recipes("limited_data")
EVALUATION_SETS = ("test", "validation")


def with_tuned(methods: Sequence[str], chosen: Mapping[str, RecipeSpec],
               tuned_only: bool = False) -> tuple[dict[str, RecipeSpec], tuple[str, ...]]:
    """The published recipes plus ``"<method>-tuned"`` for each of ``methods`` a tuning chose
    (:func:`featkd.repro.tuning.read_choice`), and the methods with those tuned names appended.

    ``tuned_only``: the methods are the student and the tuned names alone, for a table whose published rows
    were made before (the student is trained again: it is every table's baseline, and equal to the earlier
    table's student it shows that both tables' seeds drew the same data)."""
    tuned = [m for m in methods if m in chosen]
    recipes = {**RECIPES, **{m + TUNED: dataclasses.replace(chosen[m], name=m + TUNED) for m in tuned}}
    return recipes, (*(("student",) if tuned_only else methods), *(m + TUNED for m in tuned))


@dataclass(frozen=True)
class LimitedDataSetup:
    """One table: the students' share of the training split and how they are trained."""

    fraction: float
    epochs: int
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = tuple(RECIPES)
    batch_size: int = 64
    test_limit: int | None = None  # None: the whole test split
    student: str = STUDENT
    eval_every: int = 0  # 0: evaluate after the last epoch only
    # class-balanced training images (seed 0) kept out of every student's subset, for choosing settings
    validation_size: int = 5000
    evaluate_on: str = "test"  # or "validation": the test split is then not read at all
    jobs: int = 1  # > 1: the sweeps run in that many processes of one torch thread each (CPU only)
    max_sweep_work: int | None = None  # the most student-epochs of one new sweep (None: as the balance plans)

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if "student" not in self.methods:
            raise ValueError("the methods must include 'student', the baseline of every comparison")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.max_sweep_work is not None and self.max_sweep_work < 1:
            raise ValueError(f"max_sweep_work must be >= 1 student-epoch, got {self.max_sweep_work}")
        if self.validation_size < 0:
            raise ValueError(f"validation_size must be >= 0, got {self.validation_size}")
        if self.evaluate_on not in EVALUATION_SETS:
            raise ValueError(f"evaluate_on must be one of {list(EVALUATION_SETS)}, got {self.evaluate_on!r}")
        if self.evaluate_on == "validation" and not self.validation_size:
            raise ValueError("evaluate_on='validation' needs validation_size > 0")
        if self.evaluate_on == "validation" and self.test_limit is not None:
            raise ValueError("an evaluation on the validation set does not use the test split: give "
                             "evaluate_on='validation' or test_limit, not both")

    def train_limit(self, split_size: int) -> int:
        return max(round(self.fraction * split_size), 1)

    def name(self, data) -> str:
        """The run directory's and the report's name: validation runs never share a cache with test runs."""
        return f"limited-data-{self.fraction:g}-{data.name}" + ("-validation" if self.on_validation else "")

    @property
    def on_validation(self) -> bool:
        return self.evaluate_on == "validation"

    @property
    def evaluation(self) -> str:
        return f"{self.validation_size} validation images" if self.on_validation else "the test split"

    def budget(self) -> Budget:
        return Budget(f"limited-{self.fraction:g}", self.epochs, 0, self.seeds, batch_size=self.batch_size,
                      test_limit=self.test_limit)


@dataclass
class LimitedDataResult:
    markdown: str
    accuracies: dict[str, list[float]]
    teacher_acc: float
    teacher_name: str
    train_examples: int
    wall_s: float
    measured_on: str  # the hardware line of the report (:func:`featkd.provenance.hardware`)


def validation_split(full, validation_size: int):
    """(validation, pool): ``validation_size`` class-balanced training images (seed 0) set aside for choosing
    settings, and the rest, from which every seed draws its students' subset."""
    from featkd.data import stratified_split

    return stratified_split(full, validation_size, len(full) - validation_size, seed=0)


def seed_subset(pool, size: int, seed: int):
    """Seed ``seed``'s class-balanced subset of ``size`` images of the pool (every method of the seed trains on it)."""
    from featkd.data import stratified_subset

    return stratified_subset(pool, size, seed=seed)


@dataclass
class LimitedDataCells:
    """What every cell of a limited-data table shares, loaded once — the teacher (checked), the pool each seed
    draws its subset from, the evaluation set — and :meth:`train_seeds`, which trains recipes on seeds' data."""

    setup: LimitedDataSetup
    data: DataSpec
    device: torch.device
    teacher: torch.nn.Module
    teacher_name: str
    teacher_path: Path
    teacher_acc: float
    pool: object
    eval_loader: object
    full_size: int
    log: object = print
    shipped: ShippedTeacher | None = None  # what the teacher was checked against (a worker process checks it again)
    teacher_sha256: str | None = None  # recorded in every sweep's config: the teacher's identity, wherever it lies
    sweep_dirs: list[Path] = field(default_factory=list)  # every sweep :meth:`train_seeds` trained or read back

    @classmethod
    def open(cls, teacher_path, setup: LimitedDataSetup, *, data=None, device="auto",
             shipped: ShippedTeacher | None = None, log=print, teacher_acc: float | None = None) -> LimitedDataCells:
        """Load and check the teacher (with ``shipped``: its sha256, and its recorded test accuracy within 0.1
        point unless the evaluation is on the validation set), split off the validation set, load the evaluation
        set. With ``setup.evaluate_on="validation"`` the test split is never read."""
        from featkd.data import DeviceLoader, evaluation_batch_size
        from featkd.engine import evaluate

        data = data or DataSpec("fashion_mnist")
        device = protocol_device(device)
        if setup.jobs > 1 and device.type != "cpu":
            raise ValueError(f"jobs={setup.jobs} splits the work over CPU processes; on {device} leave jobs at 1")
        teacher, record = load_teacher(teacher_path, device, sha256=shipped.sha256 if shipped else None)
        full = data.load("train", None)
        validation, pool = validation_split(full, setup.validation_size)
        evaluation = validation if setup.on_validation else data.load("test", setup.test_limit)
        eval_loader = DeviceLoader(evaluation, evaluation_batch_size(device), shuffle=False, augment=False,
                                   drop_last=False, device=device)
        # load_teacher has checked the shipped teacher's file against its hash: no need to read it again
        teacher_sha256 = shipped.sha256 if shipped else file_sha256(teacher_path)
        if teacher_acc is None:  # else measured and checked by the process that started this one
            teacher_acc = evaluate(teacher, eval_loader, device=device)["acc1"]
            log(f"teacher {record['name']} ({teacher_path}): accuracy {teacher_acc:.2f}% on {setup.evaluation}")
            if shipped and not setup.on_validation and abs(teacher_acc - shipped.test_acc) > 0.1:
                raise ValueError(f"the shipped teacher scored {teacher_acc:.2f}% on the test set, recorded "
                                 f"{shipped.test_acc:.2f}%: check the dataset files, or train the teacher again "
                                 "(featkd demo --retrain-teacher)")
        return cls(setup, data, device, teacher, record["name"], Path(teacher_path), teacher_acc, pool, eval_loader,
                   len(full), log, shipped, teacher_sha256=teacher_sha256)

    @property
    def train_examples(self) -> int:
        return self.setup.train_limit(self.full_size)

    def sweep_effort(self) -> tuple[list[str], float]:
        """(the featkd code, the process seconds) of every sweep :meth:`train_seeds` trained or read back, every
        resume and invocation included: what a report says of the work behind its numbers."""
        return trained_with(self.sweep_dirs), sum(map(stored_seconds, self.sweep_dirs))

    def sweep_groups(self, work: Sequence[tuple[int, Mapping[str, RecipeSpec]]]) -> list[SweepGroup]:
        """The students of each ``(seed, recipes)`` of ``work`` by training length, the tuned recipes (group
        "-tuned") apart from the published ones, so that adding --tuned to a finished table reuses its published
        sweeps as they are."""
        groups: dict[tuple[int, int, str], list[str]] = {}
        for item, (seed, recipes) in enumerate(work):
            for name, spec in recipes.items():
                length = int(spec.changes.get("epochs", self.setup.epochs))
                groups.setdefault((item, length, TUNED if name.endswith(TUNED) else ""), []).append(name)
        return [SweepGroup(item, work[item][0], epochs, group, tuple(names))
                for (item, epochs, group), names in sorted(groups.items())]

    def train_sweep(self, sweep: PlannedSweep, recipes: Mapping[str, RecipeSpec], run_dir: Path) -> dict[str, float]:
        """Train ``recipes`` for ``sweep.epochs`` on seed ``sweep.seed``'s subset, batches, augmentation and initial
        weights, in one sweep (one teacher forward per batch) in ``run_dir/sweep.directory``; return
        ``{name: accuracy %}`` on the evaluation set."""
        from featkd.data import DeviceLoader

        setup, size, seed = self.setup, self.train_examples, sweep.seed
        base = {"experiment": "limited-data", "fraction": setup.fraction, "train_examples": size,
                "teacher": portable_path(self.teacher_path), "teacher_sha256": self.teacher_sha256,
                "dataset": self.data.name, "evaluation": setup.evaluation,
                "validation_size": setup.validation_size, "data_seed": seed}
        train = seed_subset(self.pool, size, seed)
        # the official AT code's data: pad 4 by reflection, crop, flip; every image once an epoch
        train_loader = DeviceLoader(train, setup.batch_size, shuffle=True, augment=True, device=self.device,
                                    seed=seed, pad=4, pad_mode="reflect", drop_last=False)
        budget = dataclasses.replace(setup.budget(), epochs=sweep.epochs, seeds=(seed,))
        accs = run_students(self.teacher, setup.student, [spec.to_recipe(name) for name, spec in recipes.items()],
                            budget, train.info, train_loader, self.eval_loader, run_dir / sweep.directory,
                            self.device, base, self.log, eval_every=setup.eval_every or sweep.epochs,
                            records={name: spec.record() for name, spec in recipes.items()},
                            training={name: spec.training() for name, spec in recipes.items()})
        return {name: accs[name][0] for name in recipes}

    def train_seeds(self, work: Sequence[tuple[int, Mapping[str, RecipeSpec]]], run_dir: Path) -> list[dict[str, float]]:
        """For each ``(seed, recipes)`` of ``work``, ``{name: accuracy %}`` of those recipes trained on that seed's
        data, in the sweeps :func:`featkd.repro.sweep_plan.plan_sweeps` plans (those stored in ``run_dir``
        reused); with ``setup.jobs`` > 1 in that many 1-thread processes (:mod:`featkd.repro.processes`)."""
        training = {name: spec.training() for _, recipes in work for name, spec in recipes.items()}
        processes = plan_sweeps(run_dir, self.sweep_groups(work), self.setup.jobs, training, log=self.log,
                                max_work=self.setup.max_sweep_work)
        self.log(f"sweeps in {run_dir}: {describe_plan(processes)}")
        self.sweep_dirs += [run_dir / sweep.directory for sweeps in processes for sweep in sweeps]
        calls = [[(sweep, {name: work[sweep.item][1][name] for name in sweep.names}) for sweep in sweeps]
                 for sweeps in processes]
        if self.setup.jobs > 1:
            opened = (self.teacher_path, self.setup, self.data, self.device, self.shipped, self.teacher_acc)
            results = map_in_processes(_train_sweeps_in_process, [(opened, sweeps, run_dir) for sweeps in calls],
                                       self.setup.jobs)
        else:
            results = [[self.train_sweep(sweep, recipes, run_dir) for sweep, recipes in sweeps] for sweeps in calls]
        merged: list[dict[str, float]] = [{} for _ in work]
        for sweeps, accuracies in zip(processes, results):
            for sweep, per_sweep in zip(sweeps, accuracies):
                merged[sweep.item].update(per_sweep)
        return merged


def _train_sweeps_in_process(opened, sweeps, run_dir) -> list[dict[str, float]]:
    """One process's sweeps (:meth:`LimitedDataCells.train_sweep`), one after the other, on the cells it opens."""
    cells = None
    results = []
    for sweep, recipes in sweeps:
        def log(line, sweep=sweep):
            print(f"[{sweep.directory}] {line}", flush=True)

        if cells is None:
            teacher_path, setup, data, device, shipped, teacher_acc = opened
            cells = LimitedDataCells.open(teacher_path, setup, data=data, device=device, shipped=shipped, log=log,
                                          teacher_acc=teacher_acc)
        cells.log = log
        results.append(cells.train_sweep(sweep, recipes, run_dir))
    return results


def run_limited_data(teacher_path: str | Path, setup: LimitedDataSetup, run_root: Path, *, data=None,
                     device="auto", command: str | None = None, shipped: ShippedTeacher | None = None,
                     recipes: Mapping[str, RecipeSpec] | None = None, log=print) -> LimitedDataResult:
    """Train every (method, seed) student on seed's class-balanced ``setup.fraction`` of the training split
    against the teacher in ``teacher_path``; write the report and ``results.json``; return the table.

    ``recipes`` maps each of ``setup.methods`` to its recipe (default: the published ones, :data:`RECIPES`);
    a recipe whose ``changes`` hold ``epochs`` trains that long instead of ``setup.epochs``. ``shipped`` and
    ``setup.evaluate_on`` are checked as :meth:`LimitedDataCells.open` says."""
    started = time.perf_counter()
    recipes = dict(recipes) if recipes is not None else dict(RECIPES)
    unknown = [m for m in setup.methods if m not in recipes]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(recipes)}")
    recipes = {name: recipes[name] for name in setup.methods}
    # a tuned recipe the tuning left as published (the same training) is not trained twice: its row is the published one's
    same = {name: name[:-len(TUNED)] for name in recipes if name.endswith(TUNED) and name[:-len(TUNED)] in recipes
            and recipes[name].trains_as(recipes[name[:-len(TUNED)]], setup.epochs)}
    trained = {name: spec for name, spec in recipes.items() if name not in same}
    cells = LimitedDataCells.open(teacher_path, setup, data=data, device=device, shipped=shipped, log=log)
    run_dir = run_root / setup.name(cells.data)
    accuracies: dict[str, list[float]] = {name: [] for name in setup.methods}
    for per_seed in cells.train_seeds([(seed, trained) for seed in setup.seeds], run_dir):
        for name, acc in per_seed.items():
            accuracies[name].append(acc)
    for name, published in same.items():
        accuracies[name] = list(accuracies[published])
        log(f"{name}: the tuning kept {published}'s training; its row is {published}'s (not trained again)")
    wall = time.perf_counter() - started
    size = cells.train_examples
    code, seconds = cells.sweep_effort()
    measured_on = hardware(cells.device, processes=setup.jobs)
    markdown = render_report(setup, cells.data, size, cells.full_size, accuracies, cells.teacher_acc,
                             cells.teacher_name, wall, command, recipes, measured_on, code, seconds)
    report = write_new(run_root / f"{setup.name(cells.data)}.md", markdown)
    results = {"fraction": setup.fraction, "train_examples": size, "seeds": list(setup.seeds),
               "teacher_acc": cells.teacher_acc, "accuracies": accuracies, "setup": dataclasses.asdict(setup),
               "recipes": {name: spec.record() for name, spec in recipes.items()}, "report": str(report),
               "run_dir": str(run_dir), "trained_with": code, "sweep_seconds": seconds,
               "environment": environment_info()}
    write_new(report.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    log(f"report written to {report}")
    return LimitedDataResult(markdown, accuracies, cells.teacher_acc, pretty_model(cells.teacher_name), size, wall,
                             measured_on)


def load_results(paths: Sequence[str | Path]) -> list[dict]:
    """The ``results.json`` of several limited-data tables, sorted by fraction."""
    out = []
    for path in paths:
        try:
            out.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read limited-data results {path}: {err}") from None
    return sorted(out, key=lambda r: r["fraction"])
