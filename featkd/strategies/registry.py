"""What a training strategy is to featkd's command line: a config section and a function that trains a run.

A strategy module (``featkd/strategies/<name>.py``) defines its Method, the dataclass of its config section
and its :class:`Strategy`, registered with :func:`register` next to them; ``featkd/commands/<name>.py`` is
then three lines (:func:`featkd.commands._strategy.strategy_command`). Loading the config, checking the section
(its fields' types, ranges and ``choices``, then :attr:`Strategy.check`) before anything is written, starting
the run and printing where its results are is the same for every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from featkd.config import Config

STRATEGIES: dict[str, "Strategy"] = {}


@dataclass(frozen=True)
class Strategy:
    """One strategy: ``featkd <command>`` with the config section ``section`` checked against ``config``.

    ``check(cfg, section)`` raises a ConfigError for what the types cannot say (a missing teacher...);
    ``model_name(cfg, section)`` names the default run directory; ``train(run, cfg, section)`` builds the
    Method, trains it in the started ``run`` (:func:`featkd.runs.start_run`) and returns the history of
    its last fit (or the rows it printed). ``resume_changeable``: the section's keys that ``--resume`` may change.
    """

    command: str
    section: str
    config: type
    train: Callable[[Any, Config, Any], list[dict]]
    model_name: Callable[[Config, Any], str]
    check: Callable[[Config, Any], None] = lambda cfg, section: None
    resume_changeable: tuple[str, ...] = ()
    results: tuple[str, ...] = ("best.pt", "last.pt", "metrics.jsonl")  # what the finished message lists


def register(strategy: Strategy) -> Strategy:
    if strategy.command in STRATEGIES:
        raise ValueError(f"a strategy named {strategy.command!r} is already registered")
    STRATEGIES[strategy.command] = strategy
    return strategy
