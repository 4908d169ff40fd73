"""The protocols' run cache: runs trained once into their directories, resumed, reused, never overwritten.

A run directory is reused only if its ``config.yaml`` records the same settings
(:func:`check_cached_config`); :func:`fit_or_resume` trains it, resumes it or returns its finished
history, under a lock so that two commands sharing a ``--run-dir`` do not train one run twice;
:func:`write_new` writes a report beside earlier ones rather than over them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

def fit_or_resume(method, train_loader, test_loader, run_dir: Path, epochs: int, *, log, results_only: bool = False,
                  **options) -> list[dict]:
    """Train into ``run_dir``, resume it if interrupted, or return the stored history if it is finished.

    Two commands sharing a ``--run-dir`` (the AT and NST tables share their teachers) must not train
    the same run at once: the run directory's lock marks a run in progress.

    ``results_only``: the caller reads the history, never ``method``'s models; a finished run kept without
    its checkpoints (``paper_repro/keep_sweeps.py``) is then read back from its metrics.
    """
    from featkd.locking import run_lock

    with run_lock(run_dir):
        return _fit_or_resume_unlocked(method, train_loader, test_loader, run_dir, epochs, log=log,
                                       results_only=results_only, **options)


def finished_history(run_dir: Path, epochs: int) -> list[dict] | None:
    """The history of a run that finished ``epochs`` epochs, from its ``metrics.jsonl`` (None if it did not):
    fit writes an epoch's metrics only after its checkpoint, so all of them mean that the run finished."""
    from featkd import checkpoint as ckpt

    if not (run_dir / ckpt.METRICS_JSONL).is_file():
        return None
    rows = ckpt.read_metrics(run_dir)
    return rows if [row.get("epoch") for row in rows] == list(range(1, epochs + 1)) else None


def _fit_or_resume_unlocked(method, train_loader, test_loader, run_dir: Path, epochs: int, *, log, results_only,
                            **options):
    from featkd import checkpoint as ckpt
    from featkd.engine import fit

    last = run_dir / ckpt.LAST
    if not last.is_file() and results_only and (kept := finished_history(run_dir, epochs)) is not None:
        log(f"reusing finished run {run_dir} from its metrics (kept without its checkpoints)")
        return kept
    # A run stopped before its first epoch ended holds no result: fit starts it again.
    if last.is_file():
        state = ckpt.load_checkpoint(last)
        if state["epoch"] >= epochs:
            method.load_state_dict(state["method"])
            log(f"reusing finished run {run_dir}")
            return state["history"]
        return fit(method, train_loader, test_loader, run_dir, epochs, resume=True, log=log, **options)
    return fit(method, train_loader, test_loader, run_dir, epochs, log=log, **options)


def check_cached_config(run_dir: Path, config: Mapping, recorded_since: tuple[str, ...] = (),
                        files: Mapping[str, str] | None = None) -> None:
    """A cached run is reused only if it was made with the same settings; otherwise say so (never overwrite).

    ``recorded_since``: keys that runs record only since a later version, compared when the stored run has
    them (an older run's are checked elsewhere, or not at all: the caller says which). ``files``: keys that
    name a file, each with the key of its sha256 (``{"teacher": "teacher_sha256"}``): the file is the same
    wherever it now lies (:func:`same_file`), so a run directory moved with a checkout is still reused."""
    import yaml

    from featkd import checkpoint as ckpt

    files = files or {}
    stored = run_dir / "config.yaml"
    if stored.is_file():
        old = yaml.safe_load(stored.read_text()) or {}
        # A setting the stored run does not record was not how it was made (it predates the setting).
        changed = {k: (old.get(k), v) for k, v in config.items()
                   if old.get(k) != v and not (k in recorded_since and k not in old)
                   and not (k in files and same_file(old, config, k, files[k]))}
        if changed:
            raise ckpt.RunDirectoryExistsError(
                f"{run_dir} holds a run made with other settings ({changed}: stored vs asked); "
                "it is kept as it is: choose another --run-dir")


def same_file(old: Mapping, new: Mapping, key: str, hash_key: str) -> bool:
    """Whether the stored settings ``old`` and the asked ``new`` name the same file under ``key``: by its
    sha256 when both record it; for a run stored before the hash was recorded, when its path (absolute, or as
    given) is the asked one, or the asked path inside featkd's checkout (see
    :func:`featkd.provenance.portable_path`) at the end of it: the shipped teacher of a checkout elsewhere."""
    from pathlib import PurePath

    from featkd.provenance import portable_path

    if old.get(hash_key) is not None and new.get(hash_key) is not None:
        return old[hash_key] == new[hash_key]
    before, asked = old.get(key), new.get(key)
    if before is None or asked is None:
        return False
    before_parts, asked_parts = PurePath(before).parts, PurePath(asked).parts
    return (portable_path(before) == asked or
            not PurePath(asked).is_absolute() and before_parts[-len(asked_parts):] == asked_parts)


def write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, or to ``path`` with -2, -3 ... appended if that file exists (never overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, k = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    candidate.write_text(text)
    return candidate
