"""What the commands share: the training commands' arguments, how a user's mistake is reported, and the
model-inspecting commands' ``--input-size`` and tables."""

from __future__ import annotations

import argparse
import functools
import os
import re
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


def add_sweep_process_arguments(parser) -> None:
    """--jobs and --max-sweep-work: how the sweeps of a limited-data table or a tuning are spread and sized."""
    parser.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                        help="train the sweeps in N processes of one torch thread each (CPU; default 1: one process, "
                             "torch's threads)")
    parser.add_argument("--max-sweep-work", type=positive_int, metavar="N",
                        help="the most student-epochs (students x epochs) of one new sweep (default: no limit). A "
                             "sweep's results exist once it finishes: where run directories may be lost, smaller "
                             "sweeps lose less (keep finished ones with paper_repro/keep_sweeps.py)")


def reports_user_errors(run, also: tuple[type[Exception], ...] = (), name: str | None = None):
    """Print a user's mistake (exit status 2; :data:`USER_ERRORS` and ``also``), a diverged run or a failed
    write (exit status 1), or Ctrl-C (exit status 130) as one line, not a traceback, prefixed with the command's
    ``name`` (default: from ``run``'s module); ``FEATKD_DEBUG=1`` shows the traceback instead."""
    from featkd.engine import DivergenceError

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        command = name or run.__module__.rsplit(".", 1)[-1].replace("_", "-")
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
        except PermissionError as error:  # a read-only run directory or output file, at any step
            where = error.filename or "a file featkd writes"
            return _report(f"featkd {command}: error: cannot write {where} ({error.strerror or 'permission denied'}); "
                           "give a --run-dir (or --out) in a folder you can write, or fix its permissions", 2)
        except KeyboardInterrupt as error:  # a started run says how to resume it (featkd.runs.Run)
            return _report(f"featkd {command}: {error or 'interrupted; run the same command again'}", 130)

    return wrapper


def _report(message: str, status: int) -> int:
    print(" ".join(message.split("\n")), file=sys.stderr)  # one line, whatever the message
    return status


def finished(run, history: list[dict], results: tuple[str, ...] = (ckpt.BEST, ckpt.LAST, ckpt.METRICS_JSONL)) -> int:
    """Say where a finished run's results are (on the main process only: those of ``results`` it holds, a
    name ending in ``/`` a folder pattern); the exit status."""
    if history and run.is_main:
        files = [name for name in results if any(run.run_dir.glob(name.rstrip("/")))]
        print(f"finished: {run.run_dir} ({', '.join(files)})")
    return 0


def input_size(text: str) -> tuple[int, ...]:
    """``--input-size 3x224x224`` (argparse type): one example input's size, without the batch dimension; a
    single number is a count of tokens for a model that reads token ids (``--input-size 128``)."""
    parts = re.split(r"[x,]", text.strip().lower())
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--input-size {text!r}: expected channels x height x width such as 3x224x224 (CxL for 1-d models, "
            "or a number of tokens such as 128 for a language model)"
        )
    return tuple(int(p) for p in parts)


def positive_int(text: str) -> int:
    """A count such as ``--epochs 30`` or ``--jobs 2`` (argparse type): a whole number >= 1, refused at parsing."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def describe_input(example) -> str:
    """An example input for a message: ``1x3x224x224``, or ``input_ids 1x128`` for a dict of token ids."""
    if isinstance(example, dict):
        return ", ".join(f"{key} {format_shape(tuple(value.shape))}" for key, value in example.items())
    return format_shape(tuple(example.shape))


def format_shape(shape) -> str:
    """``1x64x56x56`` for a shape; nested tuples and dicts of shapes for structured outputs; ``-`` for none."""
    if shape is None:
        return "-"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {format_shape(v)}" for k, v in shape.items()) + "}"
    if shape and all(isinstance(s, int) for s in shape):
        return "x".join(map(str, shape))
    return "(" + ", ".join(format_shape(s) for s in shape) + ")"


def text_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header with a rule under it."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_option(text: str) -> tuple[str, object]:
    """``--option KEY=VALUE`` (argparse type): a model constructor option, its value read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. image_size=64")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None
