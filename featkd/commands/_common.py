"""What the training commands share: their arguments and how a user's mistake is reported."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from featkd import checkpoint as ckpt
from featkd.layer_specs import LayerKeyError

# The user's mistakes: a wrong key, value, name or path, a run directory in the way. featkd raises these
# with a message that says what was wrong and what would be right.
USER_ERRORS = (ValueError, LayerKeyError, FileNotFoundError, FileExistsError)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--run-dir``, ``--resume`` and the ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config: a path or the name of a shipped config (featkd/configs/*.yaml)")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where checkpoints, metrics and config.yaml go (default: runs/<command>-<model>-<time>); "
                             "must be new unless --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last.pt, with its saved config.yaml "
                             "(overrides: epochs and device only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides parsed as YAML values, e.g. optim.lr=0.05 "
                             "schedule.milestones=[60,120] terms.0.weight=100 kd=null")


def reports_user_errors(run, also: tuple[type[Exception], ...] = ()):
    """Print a user's mistake (exit status 2; :data:`USER_ERRORS` and ``also``), a diverged run or a failed
    write (exit status 1), or Ctrl-C (exit status 130) as one line, not a traceback; ``FEATKD_DEBUG=1``
    shows the traceback instead."""
    from featkd.engine import DivergenceError

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        command = run.__module__.rsplit(".", 1)[-1].replace("_", "-")
        if os.environ.get("FEATKD_DEBUG", "0") not in ("", "0"):
            return run(args)
        try:
            return run(args)
        except USER_ERRORS + also as error:
            message = error.args[0] if type(error) is KeyError and error.args else error  # not KeyError's repr
            return _report(f"featkd {command}: error: {message}", 2)
        except DivergenceError as error:
            return _report(f"featkd {command}: training diverged: {error}", 1)
        except ckpt.WriteFailedError as error:
            return _report(f"featkd {command}: error: {error}", 1)
        except KeyboardInterrupt as error:  # a started run says how to resume it (featkd.runs.Run)
            return _report(f"featkd {command}: {error or 'interrupted; run the same command again'}", 130)

    return wrapper


def _report(message: str, status: int) -> int:
    print(" ".join(message.split("\n")), file=sys.stderr)  # one line, whatever the message
    return status


def finished(run, history: list[dict]) -> int:
    """Say where a finished run's results are (on the main process only); the exit status."""
    if history and run.is_main:
        files = [name for name in (ckpt.BEST, ckpt.LAST, ckpt.METRICS_JSONL) if (run.run_dir / name).is_file()]
        print(f"finished: {run.run_dir} ({', '.join(files)})")
    return 0
