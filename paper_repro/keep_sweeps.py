"""Keep the finished sweeps of a long limited-data table or tuning where the next machine will find them.

    .venv/bin/python paper_repro/keep_sweeps.py RUN_DIR KEPT_DIR

copies every finished sweep under RUN_DIR to KEPT_DIR without its checkpoints (its config, environment and
metrics: what reading it back needs), never overwriting a kept file. On another machine, copy them back and
run the same command (``--run-dir RUN_DIR``): it reads those sweeps back and trains the rest:

    mkdir -p RUN_DIR && cp -rn KEPT_DIR/. RUN_DIR/

A kept sweep holds no models: ``featkd eval`` cannot evaluate its students, only its numbers are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from featkd.checkpoint import RunDirectoryExistsError, WriteFailedError
from featkd.repro.sweep_plan import keep_finished_sweeps


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: .venv/bin/python paper_repro/keep_sweeps.py RUN_DIR KEPT_DIR", file=sys.stderr)
        return 2
    run_dir, kept_dir = map(Path, argv)
    if not run_dir.is_dir():
        print(f"keep_sweeps: {run_dir} is not a directory; give the --run-dir of a featkd tune or repro limited-data",
              file=sys.stderr)
        return 2
    try:
        kept, unfinished = keep_finished_sweeps(run_dir, kept_dir)
    except (RunDirectoryExistsError, WriteFailedError) as error:
        print(f"keep_sweeps: {error}", file=sys.stderr)
        return 1
    for directory in kept:
        print(f"kept {directory.relative_to(run_dir)}")
    for directory in unfinished:
        print(f"not finished, not kept: {directory.relative_to(run_dir)}")
    print(f"{len(kept)} finished sweeps kept in {kept_dir}, {len(unfinished)} not finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
