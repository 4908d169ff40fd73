"""Where a run's numbers come from: the code (featkd's version, git commit, uncommitted edits), the libraries
and the hardware, written as ``environment.json`` next to every run (:func:`featkd.checkpoint.write_run_info`).

Nothing here may fail a run: a value that cannot be found (not a git checkout, no ``git``, a library not
installed, no ``/proc/cpuinfo``) is recorded as ``None``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

import featkd

ENVIRONMENT_JSON = "environment.json"  # beside every run (featkd.checkpoint.write_run_info)

# Libraries whose versions change what a run computes or which models it can build.
OPTIONAL_LIBRARIES = ("torchvision", "timm", "transformers")
GIT_TIMEOUT_S = 5.0


def library_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(package_dir: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout that holds featkd's source, ``(None, None)`` when featkd does not
    run from a git checkout (an installed wheel) or git is missing. ``dirty``: the package's files differ from
    the commit (edited, added or deleted), so the commit alone does not say what code ran."""
    package_dir = Path(package_dir or Path(featkd.__file__).resolve().parent)
    # ls-files rather than rev-parse alone: a wheel installed inside some other repository's virtualenv is
    # in a git work tree but not tracked by it.
    if not _git(["ls-files", "--", package_dir.name + "/__init__.py"], package_dir.parent):
        return None, None
    commit = _git(["rev-parse", "HEAD"], package_dir.parent)
    status = _git(["status", "--porcelain", "--", package_dir.name], package_dir.parent)
    return commit, (None if commit is None or status is None else bool(status))


_CODE: tuple[str | None, bool | None] | None = None  # this process's featkd code, found once (code_state)


def code_state() -> tuple[str | None, bool | None]:
    """:func:`git_state` as this process first found it. A long run keeps the code it imported while the
    checkout moves on (a commit during a multi-hour tuning): asking git again at each run it starts would
    name code it never ran. The CLI and every worker process ask at their start."""
    global _CODE
    if _CODE is None:
        _CODE = git_state()
    return _CODE


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a record keeps it: relative to the git checkout featkd runs from when it lies inside it
    (the shipped teacher reads the same on every machine), otherwise absolute."""
    resolved = Path(path).resolve()
    checkout = Path(featkd.__file__).resolve().parents[1]
    if code_state()[0] is not None and resolved.is_relative_to(checkout):
        return resolved.relative_to(checkout).as_posix()
    return str(resolved)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, the platform's word for it elsewhere)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def gpu_name() -> str | None:
    """The name of the first CUDA device, None without CUDA."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def hardware(device: torch.device | str, processes: int = 1) -> str:
    """``device``, where the numbers were measured, in words (what the reports print): a run asked onto the CPU
    of a GPU machine names the CPU. ``processes`` > 1: the work ran in that many processes of one torch thread
    each (:mod:`featkd.repro.processes`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return (f"GPU {torch.cuda.get_device_name(device)}"
                + (", deterministic kernels" if torch.are_deterministic_algorithms_enabled() else ""))
    if device.type != "cpu":
        return f"{device.type} device"
    n = torch.get_num_threads()
    threads = f"{processes} processes × 1 torch thread" if processes > 1 else f"{n} torch thread{'s' * (n != 1)}"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, {threads}"


def environment_info() -> dict[str, Any]:
    """The code, versions and devices, written next to every run so its numbers can be traced."""
    commit, dirty = code_state()
    info: dict[str, Any] = {
        "featkd": featkd.__version__,
        "featkd_commit": commit,
        "featkd_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        **{name: library_version(name) for name in OPTIONAL_LIBRARIES},
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu_name(),
        "deterministic_kernels": torch.are_deterministic_algorithms_enabled(),
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_environment(from_epoch: int = 0, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`environment_info` for a run that trains from epoch ``from_epoch + 1``. A resumed run keeps, under
    ``earlier`` (oldest first), the environments its earlier epochs ran under (``previous``: the
    environment.json it had), so a number made over several sessions names every commit and machine that
    made it."""
    info = {**environment_info(), "from_epoch": from_epoch}
    if from_epoch:
        if previous is None:
            earlier = [{"not_recorded": f"no readable environment.json when the run resumed after epoch {from_epoch}"}]
        else:
            earlier = [*previous.get("earlier", ()), {k: v for k, v in previous.items() if k != "earlier"}]
        info["earlier"] = earlier
    return info


def code_label(environment: Mapping[str, Any]) -> str:
    """featkd's code in one word: the commit's first 12 digits, ``+edits`` with uncommitted edits, or ``unknown``."""
    commit = environment.get("featkd_commit")
    return (commit[:12] if commit else "unknown") + ("+edits" if environment.get("featkd_dirty") else "")


def trained_with(run_dirs: Iterable[Path]) -> list[str]:
    """The featkd code (:func:`code_label`) that trained the runs in ``run_dirs``, every resume included, each
    once, in the order first met; ``unknown`` for a run without a readable environment.json."""
    labels: dict[str, None] = {}
    for run_dir in run_dirs:
        try:
            environment = json.loads((Path(run_dir) / ENVIRONMENT_JSON).read_text())
        except (OSError, ValueError):
            labels["unknown"] = None
            continue
        for segment, _, _ in kept_segments(environment):
            labels["unknown" if "not_recorded" in segment else code_label(segment)] = None
    return list(labels)


def kept_segments(environment: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], int, int | None]]:
    """``(environment, first epoch, last epoch)`` of each stretch of a run that left epochs in it, oldest first;
    the last stretch's end is the run's (None). A resume stopped again before its epoch ended left none."""
    earlier = list(environment.get("earlier") or [])
    starts = [segment.get("from_epoch", 0) for segment in earlier] + [environment.get("from_epoch", 0)]
    stretches = [(segment, start + 1, end) for segment, start, end in zip(earlier, starts, starts[1:])]
    return [s for s in stretches if s[2] >= s[1] or "not_recorded" in s[0]] + [(environment, starts[-1] + 1, None)]
