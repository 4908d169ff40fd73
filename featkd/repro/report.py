"""A table protocol's run and its report: where the data comes from, the hardware, the Markdown written."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from featkd.provenance import hardware
from featkd.repro.cache import write_new
from featkd.repro.protocols import Budget, TableProtocol, protocol_device, protocol_train_loader
from featkd.repro.students import run_students, train_teacher
from featkd.repro.tables import Cell, results_table


def command_line(command: str | None) -> str:
    """The command a report names: ``command`` as given, or this process's own argv."""
    return command or " ".join(shlex.quote(a) for a in sys.argv)


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


@dataclass
class TableResult:
    markdown: str
    cells: list[Cell]
    accuracies: dict[str, dict[str, list[float]]]  # pair label -> recipe -> per-seed accuracy (%)
    teachers: dict[str, float]  # pair label -> teacher accuracy (%)
    wall_s: float


def run_protocol(protocol: TableProtocol, budget: Budget, data: DataSpec, run_root: Path, *, device="auto",
                 command: str | None = None, log=print) -> TableResult:
    """Run a table protocol: per pair, a cached teacher and one student sweep; return (and write) the table."""
    from featkd.data import DeviceLoader, evaluation_batch_size

    started = time.perf_counter()
    device = protocol_device(device)
    train = data.load("train", budget.train_limit)
    test = data.load("test", budget.test_limit)
    info = train.info
    train_loader = protocol_train_loader(train, budget, device)
    test_loader = DeviceLoader(test, evaluation_batch_size(device), shuffle=False, drop_last=False, device=device)
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
    markdown = render_report(protocol, budget, data, cells, wall, command, device)
    out = run_root / f"{protocol.name}-{budget.name}-{data.name}.md"
    write_new(out, markdown)
    log(f"table written to {out}")
    return TableResult(markdown, cells, accuracies, teachers, wall)


def render_report(protocol: TableProtocol, budget: Budget, data: DataSpec, cells: Sequence[Cell], wall_s: float,
                  command: str | None, device: torch.device | str) -> str:
    """The Markdown report of one table run: what was run, where, how long, and the table."""
    ours = data.label
    if data.name != "cifar10":
        ours += " (not CIFAR-10: compare the Δ columns, not absolute errors)"
    lines = [
        f"# {protocol.title}",
        "",
        f"- command: `{command_line(command)}`",
        f"- dataset (ours): {ours}",
        f"- {budget.describe()}",
        f"- hardware: {hardware(device)}",
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
