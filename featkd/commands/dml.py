"""``featkd dml``: Deep Mutual Learning of K peers (see :mod:`featkd.strategies.dml`).

    featkd dml --config dml --run-dir runs/dml epochs=10 dml.mode=ensemble
    featkd dml --run-dir runs/dml --resume
"""

from featkd.commands._strategy import strategy_command

add_arguments, run = strategy_command("dml")
