"""Which sweeps train a table's students: the sweeps already in the run directory first, the rest balanced.

A student's numbers depend on its seed and its recipe, never on the other members of its sweep: each
member starts from its own seed, and the teacher's outputs for a batch are the same in any sweep (tested
in ``tests/test_limited_data.py``). So the students of one seed and length may train in one sweep or in
several, and a finished table can take more methods without training its students again:

- A stored sweep of that seed and length (``seed<s>-<epochs>ep<group>`` or ``...-<k>``) whose members are
  all among the students asked is reused: finished, it is read back; interrupted, it resumes bit-exactly.
- The students left form new sweeps. With one process, one sweep per seed and length (one teacher forward
  per batch for all of them). With ``jobs`` processes, each seed's students fill the process with the
  least work up to an equal share (epochs × students), so that no process waits for a long sweep while
  another idles; a seed is split only where that share demands it (each extra sweep costs one teacher
  forward per batch).
- ``max_work`` caps a new sweep at that many student-epochs: only a finished sweep can be kept without its
  checkpoints (:func:`keep_finished_sweeps`), so where the run directory may be lost (a machine, a session)
  smaller sweeps lose less; each extra sweep again costs one teacher forward per batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from featkd.checkpoint import METRICS_JSONL, RunDirectoryExistsError, read_metrics
from featkd.sweep import MEMBERS_DIR


@dataclass(frozen=True)
class PlannedSweep:
    """One sweep to train (or read back): ``names`` of work item ``item`` on ``seed`` for ``epochs``, in
    ``run_dir/directory``."""

    item: int
    seed: int
    epochs: int
    directory: str
    names: tuple[str, ...]
    done: int = 0  # epochs a stored sweep has finished

    @property
    def work(self) -> int:
        """Student-epochs left to train."""
        return (self.epochs - min(self.done, self.epochs)) * len(self.names)


@dataclass(frozen=True)
class SweepGroup:
    """The students of work item ``item`` that train on ``seed`` for ``epochs`` (``group``: "" or "-tuned")."""

    item: int
    seed: int
    epochs: int
    group: str
    names: tuple[str, ...]

    @property
    def stem(self) -> str:
        return f"seed{self.seed}-{self.epochs}ep{self.group}"


def stored_sweeps(run_dir: Path, stem: str) -> list[Path]:
    """The sweep directories of ``stem`` in ``run_dir`` (``stem``, then ``stem-2``, ``stem-3`` ...)."""
    pattern = re.compile(re.escape(stem) + r"(?:-(\d+))?")
    found = [(int(m.group(1) or 1), path) for path in (run_dir.iterdir() if run_dir.is_dir() else ())
             if (m := pattern.fullmatch(path.name)) and (path / "config.yaml").is_file()]
    return [path for _, path in sorted(found)]


def stored_epochs(directory: Path) -> int:
    """How many epochs a stored sweep has finished (its metrics file has a line per epoch)."""
    metrics = directory / METRICS_JSONL
    return sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else 0


def stored_seconds(directory: Path) -> float:
    """The seconds a stored sweep's epochs took (training and evaluation, every invocation that ran them)."""
    rows = read_metrics(directory) if (directory / METRICS_JSONL).is_file() else []
    return sum(row.get("epoch_time_s", 0.0) + row.get("eval_time_s", 0.0) for row in rows)


def stored_members(directory: Path, seed: int) -> list[str]:
    """The recipe names a stored sweep trains on ``seed`` (its config lists members as ``<recipe>-s<seed>``)."""
    config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    suffix = f"-s{seed}"
    return [str(m)[:-len(suffix)] for m in config.get("members", ()) if str(m).endswith(suffix)]


def check_stored_recipes(directory: Path, seed: int, training: Mapping[str, dict]) -> None:
    """Refuse a finished sweep whose students trained with other settings than ``training`` asks for
    (``{name: RecipeSpec.training()}``; a sweep's config names its members, their recipes are in their configs)."""
    for name, settings in training.items():
        config_path = directory / MEMBERS_DIR / f"{name}-s{seed}" / "config.yaml"
        if not config_path.is_file():
            continue
        stored = yaml.safe_load(config_path.read_text()) or {}
        changed = sorted(k for k, v in settings.items() if stored.get(k) != v)
        if changed:
            raise RunDirectoryExistsError(
                f"{directory} holds {name} trained with other {', '.join(changed)} than asked; it is kept as it "
                "is: choose another --run-dir")


def plan_sweeps(run_dir: Path, groups: Sequence[SweepGroup], jobs: int,
                training: Mapping[str, dict] | None = None, log=print,
                max_work: int | None = None) -> list[list[PlannedSweep]]:
    """The sweeps that train ``groups``, as ``jobs`` lists, one per process, each to run in its order.

    ``training``: each name's training settings, checked against the stored sweeps reused
    (:func:`check_stored_recipes`). ``max_work``: the most student-epochs of a new sweep (a student longer
    than that trains alone)."""
    stored: list[PlannedSweep] = []
    left: list[tuple[SweepGroup, list[str], set[str]]] = []
    for group in groups:
        names, taken = list(group.names), set()
        for directory in stored_sweeps(run_dir, group.stem):
            taken.add(directory.name)
            members = stored_members(directory, group.seed)
            if members and set(members) <= set(names):
                check_stored_recipes(directory, group.seed, {n: training[n] for n in members} if training else {})
                stored.append(PlannedSweep(group.item, group.seed, group.epochs, directory.name, tuple(members),
                                           stored_epochs(directory)))
                names = [n for n in names if n not in members]
            else:
                log(f"not reused: {directory} trains {members}, not a part of {list(names)}")
        if names:
            left.append((group, names, taken))

    processes: list[list[PlannedSweep]] = [[] for _ in range(max(jobs, 1))]

    def load(k):
        return sum(sweep.work for sweep in processes[k])

    def least_loaded():
        return min(range(len(processes)), key=lambda k: (load(k), k))

    for sweep in sorted(stored, key=lambda s: -s.work):
        processes[least_loaded()].append(sweep)
    share = (sum(s.work for s in stored) + sum(g.epochs * len(names) for g, names, _ in left)) / len(processes)
    for group, names, taken in sorted(left, key=lambda entry: -entry[0].epochs * len(entry[1])):
        while names:
            k = least_loaded()
            room = math.ceil((share - load(k)) / group.epochs)
            room = room if room > 0 else len(names)  # a process past its share (rounding) takes the rest
            if max_work:
                room = min(room, max(max_work // group.epochs, 1))
            part, names = names[:room], names[room:]
            directory = next(name for name in _directory_names(group.stem) if name not in taken)
            taken.add(directory)
            processes[k].append(PlannedSweep(group.item, group.seed, group.epochs, directory, tuple(part)))
    return [sweeps for sweeps in processes if sweeps]


def describe_plan(processes: Sequence[Sequence[PlannedSweep]]) -> str:
    """One line: each process's sweeps (students × epochs, epochs already done) and the student-epochs it has
    left to train (what sets its time)."""
    def sweep(s):
        return f"{s.directory} ({len(s.names)} × {s.epochs} ep" + (f", {s.done} done" if s.done else "") + ")"

    def process(sweeps):
        finished = sum(1 for s in sweeps if not s.work)
        parts = ([f"{finished} finished sweep{'s' * (finished != 1)} read back"] if finished else []) + \
            [sweep(s) for s in sweeps if s.work]
        return ", ".join(parts) + f" = {sum(s.work for s in sweeps)} student-epochs to train"

    return "; ".join(f"process {k}: {process(sweeps)}" for k, sweeps in enumerate(processes, 1))


def _directory_names(stem: str):
    yield stem
    k = 2
    while True:
        yield f"{stem}-{k}"
        k += 1


def keep_finished_sweeps(run_dir: Path, kept_dir: Path) -> tuple[list[Path], list[Path]]:
    """Copy each finished sweep under ``run_dir`` to the same place under ``kept_dir`` without its checkpoints:
    its config, environment, metrics and members' records, all that reading it back needs
    (:func:`featkd.repro.cache.fit_or_resume` with ``results_only``), small enough to commit beside its results.
    Copy ``kept_dir`` back into a run directory and the same command reads those sweeps back and trains the rest.

    Returns (the sweeps kept, the sweeps not finished and so not kept). A file already kept is never
    overwritten: a different one raises :class:`RunDirectoryExistsError`."""
    from featkd.checkpoint import atomic_write_bytes
    from featkd.repro.cache import finished_history

    kept, unfinished = [], []
    for config_path in sorted(Path(run_dir).rglob("config.yaml")):
        directory = config_path.parent
        config = yaml.safe_load(config_path.read_text()) or {}
        if directory.parent.name == MEMBERS_DIR or not isinstance(config, dict) or "members" not in config:
            continue
        if finished_history(directory, int(config.get("epochs", 0))) is None:
            unfinished.append(directory)
            continue
        # not the checkpoints, nor a write's leftover temporary (".<name>.<random>.tmp")
        for source in sorted(p for p in directory.rglob("*")
                             if p.is_file() and p.suffix != ".pt" and not p.name.startswith(".")):
            target = Path(kept_dir) / source.relative_to(run_dir)
            if target.exists():
                if target.read_bytes() != source.read_bytes():
                    raise RunDirectoryExistsError(f"{target} already holds another file than {source}; it is kept "
                                                  "as it is: keep this run's sweeps in another directory")
                continue
            atomic_write_bytes(target, source.read_bytes())
        kept.append(directory)
    return kept, unfinished
