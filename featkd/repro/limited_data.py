"""Hinton's limited-data regime: a teacher trained on the whole training split, students on a small part.

Hinton et al. (2015) trained a speech model on 3% of its data: hard targets reached 44.5% test
accuracy, the full model's soft targets 57.5%. Knowledge transfer is largest where the student's own
data is scarce and the teacher has seen much more; that is where feature transfer can be measured on
a 2-core CPU. Here the teacher (WRN-16-2) is trained once on all of Fashion-MNIST's training split;
the students (WRN-16-1) see a class-balanced ``fraction`` of it, every method and seed in one sweep
(one teacher forward per batch, members of one seed share the student's initial weights and
batches), and each method is compared with the student alone *paired by seed* (:mod:`featkd.stats`).

Settings are fixed before any run and never chosen on the test set: the students are built and
trained by :func:`featkd.repro.students.run_students`, so their optimiser, schedule and initialisation are
the official AT code's (SGD 0.1, momentum 0.9 restarted at each decay, wd 5e-4, ×0.2 at the start of the
epochs 30/60/80% of the way through; WRN BN weights uniform on [0, 1)), the loss weights
the reference code's where one exists (AT β = 1e3 per group; NST 50 on the last feature after its
BN; KD 0.9 with CE 0.1 at T = 4). Gram and FitNets have no weight for this pair in any paper: their
weight makes the term start at about the size of the cross-entropy (measured on training batches).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from featkd import stats
from featkd.shipped import ShippedTeacher
from featkd.teachers import load_teacher
from featkd.distiller import Term
from featkd.repro.cache import write_new
from featkd.repro.protocols import Budget, pretty_model, recipe
from featkd.repro.report import DataSpec, hardware
from featkd.repro.students import run_students

STUDENT, TEACHER = "wrn16_1", "wrn16_2"
GROUPS = ["group1", "group2", "group3"]
LAST_PRE_RELU = "bn"  # the WRN's last feature after its BN, before the ReLU (where the NST code applies its MMD)
KD = {"loss": "kd", "weight": 0.9, "T": 4}


def _at(weight=1e3):
    return [Term(g, g, loss="at", weight=weight, name=f"at:{g}") for g in GROUPS]


def _nst(kernel):
    return [Term(LAST_PRE_RELU, LAST_PRE_RELU, loss="nst", weight=50.0, name=f"nst-{kernel}",
                 options={"kernel": kernel})]


# Set before any student was trained, from one training batch of three untrained students against
# the shipped teacher: the unnormalised spatial Gram distance starts at 466-485 and the group-2 hint
# at 3.1-3.4; these weights start each term at about the cross-entropy's 2.4.
GRAM_WEIGHT, HINT_WEIGHT = 5e-3, 0.75


def _fixed(terms):
    """A term builder for :func:`~featkd.repro.protocols.recipe` whose terms name their own (WRN) layers."""
    return lambda s_layers, t_layers: terms()


RECIPES = {
    "student": recipe("student"),
    "KD": recipe("KD", kd=KD, ce_weight=0.1),
    "AT": recipe("AT", _fixed(_at)),
    "NST-linear": recipe("NST-linear", _fixed(lambda: _nst("linear"))),
    "NST-poly": recipe("NST-poly", _fixed(lambda: _nst("poly"))),
    "NST-gaussian": recipe("NST-gaussian", _fixed(lambda: _nst("gaussian"))),
    "Gram": recipe("Gram", _fixed(lambda: [Term(LAST_PRE_RELU, LAST_PRE_RELU, loss="gram", weight=GRAM_WEIGHT,
                                                 name="gram")])),
    "FitNet": recipe("FitNet", _fixed(lambda: [Term("group2", "group2", loss="hint", weight=HINT_WEIGHT,
                                                    name="hint:group2")])),
}


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
    # > 0: evaluate on this many class-balanced training images outside the students' subset instead of the
    # test split: settings (epochs, share, methods) are chosen there, never on the test set
    holdout: int = 0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        unknown = [m for m in self.methods if m not in RECIPES]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {list(RECIPES)}")
        if "student" not in self.methods:
            raise ValueError("the methods must include 'student', the baseline of every comparison")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.holdout and self.test_limit is not None:
            raise ValueError("a held-out evaluation does not use the test split: give holdout or test_limit, not both")

    def train_limit(self, split_size: int) -> int:
        return max(round(self.fraction * split_size), 1)

    def name(self, data) -> str:
        """The run directory's and the report's name: validation runs never share a cache with test runs."""
        return f"limited-data-{self.fraction:g}-{data.name}" + (f"-holdout{self.holdout}" if self.holdout else "")

    @property
    def evaluation(self) -> str:
        return f"{self.holdout} held-out training images" if self.holdout else "the test split"

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


def run_limited_data(teacher_path: str | Path, setup: LimitedDataSetup, run_root: Path, *, data=None,
                     device="auto", command: str | None = None, shipped: ShippedTeacher | None = None,
                     log=print) -> LimitedDataResult:
    """Train every (method, seed) student on the class-balanced ``setup.fraction`` of the training split
    against the teacher in ``teacher_path``; write the report and ``results.json``; return the table.

    With ``shipped`` (the teacher that ships with featkd), its file must have the recorded sha256 and
    its test accuracy the recorded value (within 0.1 point), checked before any student trains. With
    ``setup.holdout`` every model is evaluated on held-out training images and the test split is not read
    (the shipped teacher is then checked by its hash alone)."""
    from featkd.data import DeviceLoader, evaluation_batch_size, stratified_split
    from featkd.engine import evaluate, resolve_device

    started = time.perf_counter()
    data = data or DataSpec("fashion_mnist")
    device = resolve_device(device)
    teacher, record = load_teacher(teacher_path, device, sha256=shipped.sha256 if shipped else None)
    full = data.load("train", None)
    full_size = len(full)
    train, held_out = stratified_split(full, setup.train_limit(full_size), setup.holdout, seed=0)
    test = held_out if setup.holdout else data.load("test", setup.test_limit)
    info = train.info
    train_loader = DeviceLoader(train, setup.batch_size, shuffle=True, augment=True, device=device, seed=0)
    test_loader = DeviceLoader(test, evaluation_batch_size(device), shuffle=False, augment=False, drop_last=False,
                               device=device)
    teacher_acc = evaluate(teacher, test_loader, device=device)["acc1"]
    log(f"teacher {record['name']} ({teacher_path}): accuracy {teacher_acc:.2f}% on {setup.evaluation}")
    if shipped and not setup.holdout and abs(teacher_acc - shipped.test_acc) > 0.1:
        raise ValueError(f"the shipped teacher scored {teacher_acc:.2f}% on the test set, recorded {shipped.test_acc:.2f}%: "
                         "check the dataset files, or train the teacher again (featkd demo --retrain-teacher)")
    recipes = [RECIPES[m] for m in setup.methods]
    budget = setup.budget()
    run_dir = run_root / setup.name(data)
    base = {"experiment": "limited-data", "fraction": setup.fraction, "train_examples": len(train),
            "teacher": str(teacher_path), "dataset": data.name, "evaluation": setup.evaluation}
    accuracies = run_students(teacher, setup.student, recipes, budget, info, train_loader, test_loader, run_dir, device,
                              base, log, eval_every=setup.eval_every or setup.epochs)
    wall = time.perf_counter() - started
    markdown = render_report(setup, data, len(train), full_size, accuracies, teacher_acc, record["name"], wall, command)
    report = write_new(run_root / f"{setup.name(data)}.md", markdown)
    results = {"fraction": setup.fraction, "train_examples": len(train), "seeds": list(setup.seeds),
               "teacher_acc": teacher_acc, "accuracies": accuracies, "setup": dataclasses.asdict(setup),
               "report": str(report)}
    write_new(report.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    log(f"report written to {report}")
    return LimitedDataResult(markdown, accuracies, teacher_acc, pretty_model(record["name"]), len(train), wall)


def render_report(setup: LimitedDataSetup, data, train_examples: int, full_size: int,
                  accuracies: dict[str, list[float]], teacher_acc: float, teacher: str, wall_s: float,
                  command: str | None) -> str:
    return "\n".join([
        f"# Limited data: {pretty_model(setup.student)} students on {setup.fraction:.0%} of {data.label} "
        f"({train_examples} of {full_size} training images), {pretty_model(teacher)} teacher trained on all "
        "of them",
        "",
        f"- command: `{command or 'featkd repro limited-data'}`",
        f"- students: {setup.epochs} epochs ({setup.budget().stages(setup.epochs)}), batch {setup.batch_size}, "
        "SGD lr 0.1 momentum 0.9 (restarted at each decay) wd 5e-4, WRN BN weights ~ U[0, 1), pad-4 zero-padded crop + flip, "
        "class-balanced subset (seed 0), "
        f"seeds {list(setup.seeds)}; evaluated on {_evaluation_set(setup)}, once, after the last epoch "
        "(no model selection)",
        "- losses: KD 0.9·T²·KL + 0.1·CE at T = 4; AT β = 1e3 on each group output, + CE; NST weight 50 on the "
        f"last feature after its BN (before the ReLU), + CE; Gram (spatial, unnormalised) {GRAM_WEIGHT:g} on that "
        f"feature, + CE; FitNet hint {HINT_WEIGHT:g} on group2 through a 1×1 regressor, + CE",
        f"- hardware: {hardware()}; torch {torch.__version__}; wall time {wall_s / 60:.1f} min",
        "",
        stats.comparison_table(accuracies, setup.seeds, teacher=teacher_acc,
                               metric="held-out accuracy %" if setup.holdout else "test accuracy %"),
        "",
        stats.INTERVAL_NOTE,
        "",
    ])


def _evaluation_set(setup: LimitedDataSetup) -> str:
    if setup.holdout:
        return (f"{setup.holdout} class-balanced training images outside the students' subset (a validation set "
                "for choosing settings; the teacher was trained on them, the students were not)")
    return f"the test split ({'all' if setup.test_limit is None else setup.test_limit} images)"


def load_results(paths: Sequence[str | Path]) -> list[dict]:
    """The ``results.json`` of several limited-data tables, sorted by fraction."""
    out = []
    for path in paths:
        try:
            out.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read limited-data results {path}: {err}") from None
    return sorted(out, key=lambda r: r["fraction"])
