"""The table protocols — AT Table 1 and the NST kernels — and the paper's training settings.

A :class:`TableProtocol` holds teacher/student pairs (its rows) and recipes (its columns), run at one
of its budgets. The recipe builders (:func:`recipe`, :func:`at_terms`, :func:`nst_terms`,
:func:`fact_terms`) give the official codes' loss weights and placements; :func:`paper_schedule`,
:func:`protocol_model_options` and :func:`protocol_train_loader` their optimiser, initialisation and data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from featkd import published
from featkd.models import default_distill_layers, pre_relu_layer

PAPER_SCHEDULE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, gamma=0.2, milestone_fractions=(0.3, 0.6, 0.8))


def paper_milestones(epochs: int) -> list[int]:
    """Where the official AT code decays the lr — at the start of (1-indexed) epochs 60/120/160 of 200 —
    scaled to ``epochs``."""
    from featkd.engine import decay_milestones

    return decay_milestones(epochs, PAPER_SCHEDULE["milestone_fractions"])


def paper_schedule(params, epochs: int, *, lr: float = PAPER_SCHEDULE["lr"], restart_momentum: bool = True):
    """(optimizer, scheduler): SGD with the paper's momentum and weight decay, lr ×0.2 at
    :func:`paper_milestones`. The official AT code builds a new optimiser at each decay, so by default
    the momentum restarts there."""
    from featkd.engine import build_optimizer, build_scheduler

    optimizer = build_optimizer(params, lr=lr, momentum=PAPER_SCHEDULE["momentum"],
                                weight_decay=PAPER_SCHEDULE["weight_decay"])
    scheduler = build_scheduler(optimizer, epochs=epochs, milestones=paper_milestones(epochs),
                                gamma=PAPER_SCHEDULE["gamma"], restart_momentum_at_milestones=restart_momentum)
    return optimizer, scheduler


def protocol_device(device):
    """The device a paper protocol trains on (``"auto"``: CUDA when there is one). On CUDA the protocol runs on
    deterministic kernels (:func:`featkd.engine.use_deterministic_kernels`), so that the same command gives the
    same table there too; call it before anything runs on the device."""
    from featkd.engine import resolve_device, use_deterministic_kernels

    device = resolve_device(device)
    if device.type == "cuda":
        use_deterministic_kernels()
    return device


def protocol_model_options(name: str) -> dict:
    """Constructor options that make a protocol's model the reference code's: WRN BN weights ~ U[0, 1)."""
    return {"bn_init": "uniform"} if name.startswith("wrn") else {}


def protocol_train_loader(ds, budget: Budget, device):
    """The official AT code's training data: padded by 4 pixels by reflection, randomly cropped, flipped;
    every example once an epoch (the last, smaller batch is kept)."""
    from featkd.data import DeviceLoader

    return DeviceLoader(ds, budget.batch_size, shuffle=True, augment=True, device=device, seed=0, pad=4,
                        pad_mode="reflect", drop_last=False)


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
        return paper_milestones(epochs)

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
class TableProtocol:
    """A paper table: its pairs (rows), recipes (columns), budgets and where the published numbers come from."""

    name: str
    title: str
    pairs: tuple[Pair, ...]
    recipes: tuple[Recipe, ...]
    budgets: Mapping[str, Budget]
    published_note: str


def pretty_model(name: str) -> str:
    """A model name as the papers write it: ``wrn16_1`` → ``WRN-16-1``, ``nin`` → ``NIN-wide``."""
    if name.startswith("wrn"):
        depth, width = name[3:].split("_")
        return f"WRN-{depth}-{width}"
    return {"nin": "NIN-wide", "nin_thin": "NIN-thin"}.get(name, name)


def at_terms(s_layers, t_layers):
    """AT on each (student, teacher) layer pair, as the official AT code weighs it."""
    from featkd.distiller import Term

    weight = published.term_weight("at")  # featkd/configs/reference/published.yaml: β per group
    return [Term(t, s, loss="at", weight=weight, name=f"at:{s}") for s, t in zip(s_layers, t_layers)]


def fact_terms(s_layers, t_layers):
    """F-ActT: an L2 hint on each (student, teacher) layer pair."""
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


def nst_terms(kernel: str, which: str):
    """A term builder for NST with ``kernel`` on the last layer pair (``which="last"``) or on every one."""

    def terms(s_layers, t_layers):
        from featkd.distiller import Term

        pairs = list(zip(s_layers, t_layers))
        pairs = pairs[-1:] if which == "last" else pairs
        # the published weight on the (1/C²-normalised) MMD; the official code applies it once, to the last map
        weight = published.term_weight("nst")
        return [Term(t, s, loss="nst", weight=weight, name=f"nst-{kernel}:{s}", options={"kernel": kernel})
                for s, t in pairs]
    return terms


# Small enough for a 2-core CPU shared with other jobs; the same data and teacher settings in
# every protocol so that the cached teachers are shared between tables.
CPU_BUDGET = Budget("cpu", 4, 6, (0, 1), batch_size=64, train_limit=2000, test_limit=1000, pairs=1)

# (Distiller kd, CE weight) of the AT code's and the NST code's logit terms (featkd/configs/reference/published.yaml)
AT_KD, AT_KD_CE = published.distiller_kd("kd_at")
NST_KD, NST_KD_CE = published.distiller_kd("kd_nst")


def recipe(name, terms=None, kd=None, ce_weight=1.0, layers=default_distill_layers) -> Recipe:
    """A :class:`Recipe` from a term builder ``terms(student_layers, teacher_layers)`` and/or KD options
    (the student alone, cross-entropy only, when both are None)."""
    if terms is None and kd is None:
        return Recipe(name, None)
    return Recipe(name, lambda s, t: dict(terms=terms(s, t) if terms else [], kd=kd, ce_weight=ce_weight), layers)


AT_TABLE1 = TableProtocol(
    name="at-table1",
    title="AT paper, Table 1: activation-based attention transfer on CIFAR-10 (error %)",
    pairs=(
        Pair("wrn16_1", "wrn16_2", {"student": 8.77, "AT": 7.93, "teacher": 6.31}),
        Pair("wrn16_1", "wrn40_1", {"student": 8.77, "AT": 8.25, "KD": 8.39, "teacher": 6.58}),
        Pair("wrn16_2", "wrn40_2", {"student": 6.31, "AT": 5.85, "KD": 6.08, "teacher": 5.23}),
        Pair("nin_thin", "nin", {}),
    ),
    recipes=(
        recipe("student"),
        recipe("AT", at_terms),
        recipe("F-ActT", fact_terms),
        recipe("KD", kd=AT_KD, ce_weight=AT_KD_CE),
        recipe("AT+KD", at_terms, kd=AT_KD, ce_weight=AT_KD_CE),
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

NST_KERNELS = TableProtocol(
    name="nst-kernels",
    title="NST kernels (linear, polynomial d=2 c=0, Gaussian) on the last group and on all groups, alone and with KD",
    pairs=AT_TABLE1.pairs,
    recipes=(
        recipe("student"),
        recipe("KD", kd=NST_KD, ce_weight=NST_KD_CE),
        *(recipe(f"NST-{k}@last", nst_terms(k, "last"), layers=nst_layers) for k in KERNELS),
        *(recipe(f"NST-{k}@last+KD", nst_terms(k, "last"), kd=NST_KD, ce_weight=NST_KD_CE, layers=nst_layers)
          for k in KERNELS),
        *(recipe(f"NST-{k}@all", nst_terms(k, "all"), layers=nst_layers) for k in KERNELS),
        *(recipe(f"NST-{k}@all+KD", nst_terms(k, "all"), kd=NST_KD, ce_weight=NST_KD_CE, layers=nst_layers)
          for k in KERNELS),
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
