"""The one command every training strategy uses (:mod:`featkd.strategies.registry`)."""

from __future__ import annotations

import argparse
from importlib import import_module

from featkd import runs
from featkd.commands._common import add_run_arguments, finished, reports_user_errors


def strategy_command(command: str):
    """``(add_arguments, run)`` of ``featkd <command>`` for the strategy registered under that name."""

    def run(args: argparse.Namespace) -> int:
        from featkd.strategies.registry import STRATEGIES

        if command not in STRATEGIES:
            import_module(f"featkd.strategies.{command.replace('-', '_')}")  # registers it
        strategy = STRATEGIES[command]
        cfg, section, resolved = runs.load_strategy_config(strategy.section, strategy.config, args.config,
                                                           args.run_dir, args.resume, args.overrides,
                                                           runs.RESUME_CHANGEABLE + strategy.resume_changeable)
        strategy.check(cfg, section)
        with runs.start_run(cfg, command, strategy.model_name(cfg, section), args.run_dir, args.resume,
                            resolved) as started:
            history = strategy.train(started, cfg, section)
        return finished(started, history, strategy.results)

    return add_run_arguments, reports_user_errors(run, name=command)
