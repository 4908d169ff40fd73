"""``featkd born-again``: Born-Again Networks, N generations in one command (see :mod:`featkd.strategies.born_again`).

    featkd born-again --config born_again --run-dir runs/ban born_again.generations=3
    featkd born-again --run-dir runs/ban --resume          # skips the generations already complete
"""

from featkd.commands._strategy import strategy_command

add_arguments, run = strategy_command("born-again")
