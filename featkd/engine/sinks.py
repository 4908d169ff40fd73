"""Where a run's per-epoch metrics go: the sinks :func:`featkd.engine.fit` writes to after every epoch.

* :class:`MetricsFiles`: ``metrics.jsonl`` and ``metrics.csv``, rewritten from the whole history, so a
  run resumed after a kill has exactly one row per epoch;
* :class:`TensorBoard`: event files under ``<run dir>/tensorboard`` when the ``tensorboard`` package is
  installed (``pip install 'featkd[tensorboard]'``), for the curves where researchers look for them;
* :class:`Console`: one summary line per epoch.

The sweep writes each member's run directory through the same sinks (:func:`run_sinks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from featkd import checkpoint as ckpt


class Sink(Protocol):
    def write(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Called after every epoch with every row so far (the newest last)."""

    def close(self) -> None: ...


class MetricsFiles:
    """``metrics.jsonl`` / ``metrics.csv`` in ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)

    def write(self, history):
        ckpt.write_metrics(self.run_dir, list(history))

    def close(self):
        pass


class TensorBoard:
    """Every numeric metric of each new row as a scalar at step = epoch, in ``run_dir/tensorboard``.

    ``logged_epochs`` epochs were logged by an earlier process (a resumed run): their rows are not
    written again, and whatever that process logged after them (epochs the checkpoint does not hold)
    is purged. ``writer_class`` is ``torch.utils.tensorboard.SummaryWriter`` or a stand-in.
    """

    def __init__(self, run_dir: str | os.PathLike, writer_class: Callable, logged_epochs: int = 0):
        self.writer = writer_class(str(Path(run_dir) / ckpt.TENSORBOARD_DIR),
                                   purge_step=logged_epochs + 1 if logged_epochs else None)
        self.logged = logged_epochs

    def write(self, history):
        for row in history[self.logged:]:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, global_step=row["epoch"])
        self.logged = len(history)
        self.writer.flush()

    def close(self):
        self.writer.close()


def tensorboard_writer_class() -> Callable | None:
    """``SummaryWriter`` when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class Console:
    """One line per epoch through ``log``: the epoch and every float metric."""

    def __init__(self, log: Callable[[str], Any] = print):
        self.log = log

    def write(self, history):
        self.log(summary(history[-1]))

    def close(self):
        pass


def summary(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key, value in row.items():
        if key not in ("epoch", "step") and isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


def run_sinks(run_dir: str | os.PathLike, log: Callable[[str], Any] | None = None,
              logged_epochs: int = 0) -> list[Sink]:
    """The metrics files, TensorBoard when it is installed, and the console when ``log`` is given."""
    sinks: list[Sink] = [MetricsFiles(run_dir)]
    writer_class = tensorboard_writer_class()
    if writer_class is not None:
        sinks.append(TensorBoard(run_dir, writer_class, logged_epochs))
    if log is not None:
        sinks.append(Console(log))
    return sinks
