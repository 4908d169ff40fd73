"""``featkd adversarial``: adversarial KD with a conditional discriminator (see :mod:`featkd.strategies.adversarial`).

    featkd adversarial --config adversarial --run-dir runs/adv teacher.checkpoint=runs/teacher/last.pt
    featkd adversarial --run-dir runs/adv --resume
"""

from featkd.commands._strategy import strategy_command

add_arguments, run = strategy_command("adversarial")
