"""One process per run directory: :func:`run_lock`, a lock file beside the directory that names its holder.

A lock records the holder's PID and host. A second process asking for it is refused with a message
naming that holder, unless the holder is gone: a lock whose process no longer runs on this host
(``kill -9``, a crash, a reboot) is stale and is taken over, so an interrupted run can always be
started again. The training commands hold the lock of their run directory from the start of the run
(:func:`featkd.runs.start_run`), the paper protocols around each run they train.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from featkd.checkpoint import RunDirectoryExistsError


class RunDirectoryLockedError(RunDirectoryExistsError):
    """Another live process is training in the run directory."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of ``run_dir``: beside it, so that the run directory holds only the run."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the lock of ``run_dir`` while the block runs, so that no two processes train in it at once.

    The lock file records the holder's PID and host. Asking for a lock that a live process holds raises
    :class:`RunDirectoryLockedError` naming that process; a lock whose process no longer runs on this host
    (``kill -9``, a crash, a reboot) is stale and is taken over.
    """
    lock = lock_path(run_dir)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    _acquire(lock, mine, run_dir)
    try:
        yield lock
    finally:
        if _read_lock(lock) == mine:
            lock.unlink(missing_ok=True)


def _acquire(lock: Path, mine: str, run_dir) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # a stale lock is set aside, then the lock is taken; others may race for it
        # The content is written first and linked into place, so a lock file is never seen half-written.
        fd, tmp = tempfile.mkstemp(prefix=f"{lock.name}.", suffix=".tmp", dir=lock.parent)
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        try:
            os.link(tmp, lock)
            return
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        held = _read_lock(lock)
        if held is None:  # released meanwhile
            continue
        holder = _holder(held)
        if holder is None:
            raise RunDirectoryLockedError(f"{run_dir} is locked by {lock}, which names no process; if nothing is "
                                          f"training in {run_dir}, delete {lock}")
        if holder["host"] != socket.gethostname() or _process_alive(holder["pid"]):
            since = f" since {holder['since']}" if "since" in holder else ""
            raise RunDirectoryLockedError(
                f"{run_dir} is in use: process {holder['pid']} on {holder['host']} has been training in it{since}; "
                f"wait for it to finish, or, if that process is gone, delete {lock}")
        _set_aside(lock, held)
    raise RunDirectoryLockedError(f"{run_dir} is in use: other processes keep taking {lock}; try again")


def _holder(text: str) -> dict | None:
    """The ``{pid, host, since}`` a lock file names, or None when it names none."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    if isinstance(holder, int) and not isinstance(holder, bool):  # the bare PID of featkd's earlier locks
        return {"pid": holder, "host": socket.gethostname()}
    return holder if isinstance(holder, dict) and {"pid", "host"} <= holder.keys() else None


def _read_lock(lock: Path) -> str | None:
    try:
        return lock.read_text()
    except FileNotFoundError:
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def _set_aside(lock: Path, stale: str) -> None:
    """Remove the stale lock ``lock`` holding ``stale``, unless another process replaced it meanwhile."""
    aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process set it aside first
    if aside.read_text() != stale:  # a live lock taken since it was read: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink()
