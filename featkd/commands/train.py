"""``featkd train``: train one model (a teacher, or a student without distillation) with cross-entropy.

    featkd train --config fmnist_teacher_wrn16_2 --run-dir runs/teacher epochs=30 optim.lr=0.05
    featkd train --run-dir runs/teacher --resume            # continue a killed run
    torchrun --nproc_per_node=2 -m featkd.cli train ...      # DistributedDataParallel
"""

from __future__ import annotations

import argparse

from featkd import runs
from featkd.commands._common import add_run_arguments, finished, reports_user_errors


add_arguments = add_run_arguments  # --config, --run-dir, --resume, key=value overrides


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    return finished(*runs.train_model(args.config, args.run_dir, args.resume, args.overrides))
