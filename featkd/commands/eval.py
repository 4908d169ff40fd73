"""``featkd eval``: evaluate a checkpoint on a dataset split.

    featkd eval --run-dir runs/kd_at_nst
    featkd eval --run-dir runs/kd_at_nst --split train data.limit=5000
    featkd eval --checkpoint runs/teacher/last.pt --config other_data.yaml --output scores.json

``--run-dir`` evaluates the last epoch's ``last.pt``: ``best.pt`` is the epoch that scored best on
the split the run evaluated on — the test split unless its config says otherwise — so its test
score is selected on the test set and is not a result to report (``--which best`` still reads it).

Every kind of run: every model of the checkpoint is evaluated (DML's peers and their ensemble, a sweep's
members, a born-again run's generations and their ensembles, the teachers and students of the repro
runs). A sweep member's directory names the sweep checkpoint that holds its model.

The data settings default to those the run was trained with (its saved config's ``data``, ``device``
and ``amp``; a repro run's dataset); ``--config`` and ``key=value`` overrides change them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from featkd import checkpoint as ckpt
from featkd.commands._common import reports_user_errors
from featkd.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE", help="a checkpoint written by featkd train/distill")
    source.add_argument("--run-dir", metavar="DIR", help="a run directory: evaluates its last.pt (see --which)")
    parser.add_argument("--which", choices=("last", "best"), default="last",
                        help="with --run-dir: which checkpoint (best.pt was selected on the run's evaluation split)")
    parser.add_argument("--model", metavar="NAME", help="evaluate only this model of the checkpoint (default: all)")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--config", metavar="FILE", help="YAML whose data section replaces the run's")
    parser.add_argument("--output", metavar="FILE", help="also write the scores as JSON here (must not exist)")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.test_limit=1000")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import torch

    from featkd.engine import Precision, evaluate, resolve_device
    from featkd.run_data import evaluation_loader
    from featkd.saved_runs import evaluation_base, run_checkpoints, saved_without_record

    if args.resume:
        raise ConfigError("featkd eval has nothing to resume; drop --resume")
    if args.output and Path(args.output).exists():
        raise ConfigError(f"--output {args.output} already exists; choose another file")
    paths = [("", Path(args.checkpoint))] if args.checkpoint else run_checkpoints(args.run_dir, args.which)
    states = [(prefix, path, ckpt.load_checkpoint(path)) for prefix, path in paths]
    first = states[0][2]
    cfg = load_config(args.config, args.overrides, base=evaluation_base(first.get("config"), first["models"]))
    device = resolve_device(cfg.device)
    loader, batch_format, data = evaluation_loader(cfg, args.split, device)
    results = {"split": args.split, "dataset": data.info.name, "examples": len(data)}
    results.update({"checkpoint": str(paths[0][1]), "epoch": first["epoch"]} if len(states) == 1 else
                   {"checkpoints": {str(path): state["epoch"] for _, path, state in states}})
    for prefix, path, state in states:
        for name in [args.model] if args.model else sorted(state["models"]):
            if not args.model and saved_without_record(state["models"][name]):
                print(f"{prefix}{name}: not evaluated: {path} holds its weights without the record that rebuilds "
                      "it (saved by an older featkd)", file=sys.stderr)
                continue
            model, _ = ckpt.model_from_checkpoint(state, device, name, source=str(path))
            with torch.no_grad():
                scores = evaluate(model, loader, device=device, precision=Precision(cfg.amp, device),
                                  batch_format=batch_format)
            results[prefix + name] = scores
            print(f"{prefix}{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if args.output:
        ckpt.atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    return 0
