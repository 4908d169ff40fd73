"""``featkd tune``: every method's settings chosen on the validation images, with the same budget for each.

The search space and the budget are data (``featkd/configs/tuning/<table>.yaml``), fixed before any run:
per method, the published recipe and ``candidates - 1`` points drawn (by ``sample_seed``) from the
method's own settings, the same share at every training length (:func:`candidates`) — the same number
for every method, fewer only where a grid is smaller. Successive halving over seeds spends the budget:
at rung r every surviving candidate is trained on the first ``rung_seeds[r]`` tuning seeds (each seed draws its own subset, batch order,
augmentation and initial weights; a candidate trains on a seed once), scored by its mean validation
accuracy over them, and the better half (rounded up) goes on. The rule that picks the setting is in
code (:func:`select`): after the last rung, the highest mean validation accuracy; a tie goes to the
candidate listed first (the published one, then the grid's order). The test split is never read.

The chosen settings go to a YAML file with their provenance (:func:`write_choice`), which the tables and
``featkd demo`` read; the report lists every candidate's score at every rung with its interval.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

from featkd import stats
from featkd.config import CONFIG_DIR, ConfigError, read_yaml
from featkd.provenance import environment_info, hardware, portable_path
from featkd.repro.cache import write_new
from featkd.repro.limited_data import RECIPES, LimitedDataCells, LimitedDataSetup
from featkd.repro.limited_data_report import describe_recipe, effort_lines
from featkd.repro.recipes import RecipeSpec
from featkd.teachers import file_sha256

TUNING_DIR = CONFIG_DIR / "tuning"
SPACE_KEYS = ("candidates", "rung_seeds", "seeds", "sample_seed", "epochs", "methods")


@dataclass(frozen=True)
class TuningSpace:
    """What is tuned and with which budget (see the module docstring)."""

    methods: Mapping[str, Mapping[str, Sequence[Any]]]
    epochs: tuple[int, ...]
    candidates: int
    rung_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    sample_seed: int = 0

    def __post_init__(self):
        if self.candidates < 1:
            raise ConfigError(f"tuning: candidates must be >= 1, got {self.candidates}")
        if not self.epochs or min(self.epochs) < 1:
            raise ConfigError(f"tuning: epochs must be a non-empty list of lengths >= 1, got {list(self.epochs)}")
        if not self.rung_seeds or list(self.rung_seeds) != sorted(set(self.rung_seeds)) or self.rung_seeds[0] < 1:
            raise ConfigError(f"tuning: rung_seeds must increase from >= 1, got {list(self.rung_seeds)}")
        if self.rung_seeds[-1] > len(self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"tuning: the last rung needs {self.rung_seeds[-1]} distinct seeds, got {list(self.seeds)}")
        if "student" not in self.methods:
            raise ConfigError("tuning: the methods must include 'student', the baseline")

    @classmethod
    def load(cls, table: str = "limited_data", path: str | Path | None = None) -> TuningSpace:
        path = Path(path) if path else TUNING_DIR / f"{table}.yaml"
        data = read_yaml(path)
        unknown = sorted(set(data) - set(SPACE_KEYS))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; a tuning space has {list(SPACE_KEYS)}")
        return cls({str(k): dict(v or {}) for k, v in data["methods"].items()}, tuple(data["epochs"]),
                   int(data["candidates"]), tuple(data["rung_seeds"]), tuple(data["seeds"]),
                   int(data.get("sample_seed", 0)))

    def restricted(self, methods: Sequence[str]) -> TuningSpace:
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ConfigError(f"tuning: no search space for {unknown}; the space has {list(self.methods)}")
        return dataclasses.replace(self, methods={m: self.methods[m] for m in dict.fromkeys(["student", *methods])})


def candidates(space: TuningSpace, method: str, published: RecipeSpec) -> list[RecipeSpec]:
    """The published recipe (at the shortest length) and ``candidates - 1`` others, the same share at every
    training length (the first lengths take the remainder): the length dominates what a student reaches, so a
    draw from the joint grid would tune some methods at the longer lengths much more than others. At each
    length the candidates are drawn (by ``sample_seed``) from the method's settings grid and, past the first
    length, the published settings at that length; listed by length, then in grid order."""
    keys = list(space.methods[method])
    settings = [dict(zip(keys, values)) for values in itertools.product(*(space.methods[method][k] for k in keys))]
    lengths = len(space.epochs)
    shares = [space.candidates // lengths + (i < space.candidates % lengths) for i in range(lengths)]
    rng = np.random.default_rng([space.sample_seed, sum(map(ord, method))])
    chosen = []
    for i, (epochs, share) in enumerate(zip(space.epochs, shares)):
        published_here = {"epochs": epochs}
        pool = [{"epochs": epochs, **point} for point in settings if point]
        if i == 0:
            chosen.append(published_here)
            share -= 1
        else:
            pool.insert(0, published_here)
        take = sorted(rng.choice(len(pool), size=min(share, len(pool)), replace=False).tolist()) if share > 0 else []
        chosen += [pool[k] for k in take]
    return [dataclasses.replace(published.with_changes(point), name=f"{method}.c{k}") for k, point in enumerate(chosen)]


def select(scores: Mapping[str, Sequence[float]]) -> str:
    """The rule, fixed before any run: the highest mean score; a tie goes to the candidate listed first."""
    names = list(scores)
    return max(names, key=lambda name: (float(np.mean(scores[name])), -names.index(name)))


def survivors(scores: Mapping[str, Sequence[float]]) -> list[str]:
    """The better half (rounded up) by mean score, in the candidates' order."""
    ranked = sorted(scores, key=lambda name: (-float(np.mean(scores[name])), list(scores).index(name)))
    kept = set(ranked[:math.ceil(len(ranked) / 2)])
    return [name for name in scores if name in kept]


@dataclass
class TuningResult:
    chosen: dict[str, RecipeSpec]  # method -> its chosen recipe (named after the method)
    scores: dict[str, dict[str, list[float]]]  # method -> candidate -> validation accuracy per seed trained
    rungs: dict[str, list[list[str]]]  # method -> the candidates alive at each rung
    markdown: str
    wall_s: float
    measured_on: str  # the hardware line of the report (:func:`featkd.provenance.hardware`)
    trained_with: list[str] = dataclasses.field(default_factory=list)  # featkd code the candidates trained at
    sweep_seconds: float = 0.0  # process time of the candidates' sweeps, every invocation included


def run_tuning(teacher_path, setup: LimitedDataSetup, space: TuningSpace, run_root: Path, *, data=None,
               device="auto", shipped=None, command: str | None = None, log=print) -> TuningResult:
    """Tune every method of ``space`` for ``setup``'s share and batch size on the validation images."""
    started = time.perf_counter()
    setup = dataclasses.replace(setup, evaluate_on="validation", test_limit=None, seeds=tuple(space.seeds),
                                methods=tuple(space.methods))
    unknown = [m for m in space.methods if m not in RECIPES]
    if unknown:
        raise ConfigError(f"tuning: no published recipe for {unknown}; known: {list(RECIPES)}")
    cells = LimitedDataCells.open(teacher_path, setup, data=data, device=device, shipped=shipped, log=log)
    specs = {m: candidates(space, m, RECIPES[m]) for m in space.methods}
    by_name = {spec.name: spec for method in specs.values() for spec in method}
    method_of = {spec.name: m for m, method in specs.items() for spec in method}
    alive = {m: [spec.name for spec in specs[m]] for m in space.methods}
    scores: dict[str, dict[str, list[float]]] = {m: {name: [] for name in alive[m]} for m in space.methods}
    rungs: dict[str, list[list[str]]] = {m: [] for m in space.methods}
    run_dir = run_root / f"tune-{setup.name(cells.data)}"
    for rung, n_seeds in enumerate(space.rung_seeds):
        for m in space.methods:
            if rung:
                alive[m] = survivors({name: scores[m][name] for name in alive[m]})
            rungs[m].append(list(alive[m]))
        work = []
        for seed in space.seeds[:n_seeds]:
            todo = {name: by_name[name] for m in space.methods for name in alive[m]
                    if len(scores[m][name]) <= space.seeds.index(seed)}
            if todo:
                log(f"tuning rung {rung}: seed {seed}, {len(todo)} candidates")
                work.append((seed, todo))
        # a seed's scores are appended in the seeds' order, whichever process trained them
        for per_seed in cells.train_seeds(work, run_dir / f"rung{rung}"):
            for name, acc in per_seed.items():
                scores[method_of[name]][name].append(acc)
    chosen = {}
    for m in space.methods:
        winner = select({name: scores[m][name] for name in alive[m]})
        chosen[m] = dataclasses.replace(by_name[winner], name=m)
    wall = time.perf_counter() - started
    code, seconds = cells.sweep_effort()
    measured_on = hardware(cells.device, processes=setup.jobs)
    markdown = render_tuning(setup, space, cells, specs, scores, rungs, chosen, wall, command, measured_on, code,
                             seconds)
    return TuningResult(chosen, scores, rungs, markdown, wall, measured_on, code, seconds)


def render_tuning(setup, space, cells, specs, scores, rungs, chosen, wall_s, command, measured_on, code=(),
                  sweep_seconds=0.0) -> str:
    steps = {m: sum(int(s.changes.get("epochs", setup.epochs)) * len(scores[m][s.name]) for s in specs[m])
             for m in space.methods}
    lines = [f"# Tuning on {setup.validation_size} validation images: {setup.fraction:.0%} of {cells.data.label}, "
             f"{cells.teacher_name} teacher ({cells.teacher_acc:.2f}% on them)", "",
             f"- command: `{command or 'featkd tune'}`",
             f"- budget per method: the published recipe + {space.candidates - 1} grid points (fewer where the grid is "
             f"smaller), successive halving over seeds {list(space.seeds)} at rungs of {list(space.rung_seeds)} "
             "seeds, the better half kept at each rung",
             "- rule (fixed in code before the runs): the highest mean validation accuracy over the last rung's seeds; "
             "a tie goes to the candidate listed first; the test split is never read",
             "- student-epochs spent per method: " + ", ".join(f"{m} {steps[m]}" for m in space.methods),
             f"- hardware: {measured_on}; torch {torch.__version__}; wall time {wall_s / 60:.1f} min",
             *effort_lines(code, sweep_seconds, "the candidates"), ""]
    for m in space.methods:
        lines += [f"## {m}", "", "| candidate | changes | " + " | ".join(f"rung {r} ({n} seeds)" for r, n in
                                                                        enumerate(space.rung_seeds)) + " |",
                  "|---|---|" + "---|" * len(space.rung_seeds)]
        for spec in specs[m]:
            cells_text = []
            for r, n in enumerate(space.rung_seeds):
                values = scores[m][spec.name][:n]
                alive = spec.name in rungs[m][r]
                cells_text.append(stats.t_interval(values).format() if alive and len(values) == n else "—")
            mark = " **chosen**" if dict(spec.changes) == dict(chosen[m].changes) else ""
            lines.append(f"| {spec.name}{mark} | {dict(spec.changes)} | " + " | ".join(cells_text) + " |")
        lines += ["", f"chosen: {describe_recipe(chosen[m])}, {dict(chosen[m].changes)}", ""]
    return "\n".join(lines)


def write_choice(result: TuningResult, path: Path, *, setup: LimitedDataSetup, teacher_path, report: Path,
                 command: str | None) -> Path:
    """The chosen recipes as YAML with their provenance (never over an existing file)."""
    env = environment_info()
    data = {"provenance": {"command": command, "report": str(report), "teacher": portable_path(teacher_path),
                           "teacher_sha256": file_sha256(teacher_path), "fraction": setup.fraction,
                           "validation_size": setup.validation_size, "featkd_commit": env.get("featkd_commit"),
                           "trained_with": list(result.trained_with),
                           "sweep_seconds": round(result.sweep_seconds, 1),
                           "torch": str(torch.__version__), "hardware": result.measured_on,
                           "date": time.strftime("%Y-%m-%d")},
            "chosen": {m: {"changes": dict(spec.changes), "recipe": spec.record()} for m, spec in result.chosen.items()}}
    return write_new(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_choice(path: str | Path) -> tuple[dict[str, RecipeSpec], dict]:
    """``({method: tuned recipe}, provenance)`` from a file :func:`write_choice` wrote: the published recipe with the
    recorded changes applied (so the file stays readable when a published recipe gains a field)."""
    data = read_yaml(path)
    try:
        chosen, provenance = data["chosen"], data["provenance"]
    except KeyError as missing:
        raise ConfigError(f"{path} is not a tuning choice (no {missing} section); write one with featkd tune") from None
    unknown = [m for m in chosen if m not in RECIPES]
    if unknown:
        raise ConfigError(f"{path}: no published recipe for {unknown}; known: {list(RECIPES)}")
    return ({m: dataclasses.replace(RECIPES[m].with_changes(entry["changes"]), name=m) for m, entry in chosen.items()},
            provenance)


def tuning_json(result: TuningResult) -> str:
    return json.dumps({"scores": result.scores, "rungs": result.rungs,
                       "chosen": {m: spec.record() for m, spec in result.chosen.items()}}, indent=2) + "\n"
