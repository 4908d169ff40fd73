"""The protocols' run cache: runs trained once into their directories, resumed, reused, never overwritten.

A run directory is reused only if its ``config.yaml`` records the same settings
(:func:`check_cached_config`); :func:`fit_or_resume` trains it, resumes it or returns its finished
history, under a lock so that two commands sharing a ``--run-dir`` do not train one run twice;
:func:`write_new` writes a report beside earlier ones rather than over them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_UNFINISHED_FIRST_EPOCH = {"config.yaml", "environment.json"}


def fit_or_resume(method, train_loader, test_loader, run_dir: Path, epochs: int, *, log, **options) -> list[dict]:
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


def check_cached_config(run_dir: Path, config: Mapping) -> None:
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


def write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, or to ``path`` with -2, -3 ... appended if that file exists (never overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, k = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    candidate.write_text(text)
    return candidate
