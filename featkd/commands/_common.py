"""What the training commands share: their arguments and how a user's mistake is reported."""

from __future__ import annotations

import argparse
import functools
import sys

from featkd import checkpoint as ckpt
from featkd.config import ConfigError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--run-dir``, ``--resume`` and the ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config: a path or the name of a shipped config (featkd/configs/*.yaml)")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where checkpoints, metrics and config.yaml go (default: runs/<command>-<model>-<time>); "
                             "must be new unless --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last.pt, with its saved config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides parsed as YAML values, e.g. optim.lr=0.05 "
                             "schedule.milestones=[60,120] terms.0.weight=100 kd=null")


def reports_user_errors(run):
    """Print a mistake in the config, paths or run directory (exit status 2) or a diverged run (exit
    status 1) as one line, not a traceback."""
    from featkd.engine import DivergenceError

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        command = run.__module__.rsplit(".", 1)[-1].replace("_", "-")
        try:
            return run(args)
        except (ConfigError, ckpt.RunDirectoryExistsError, FileNotFoundError) as error:
            print(f"featkd {command}: error: {error}", file=sys.stderr)
            return 2
        except DivergenceError as error:
            print(f"featkd {command}: training diverged: {error}", file=sys.stderr)
            return 1

    return wrapper


def finished(run, history: list[dict], holds: str = "best.pt, last.pt, metrics.jsonl") -> int:
    """Say where a finished run's results are (on the main process only); the exit status."""
    if history and run.is_main:
        print(f"finished: {run.run_dir} ({holds})")
    return 0
