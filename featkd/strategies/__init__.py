"""Other ways to move knowledge between networks, as ``featkd.engine`` Methods, each with its config section
and its :class:`Strategy` (registered next to it; ``featkd/commands/<name>.py`` is three lines):

* :class:`DeepMutualLearning` (``featkd dml``) - K peers trained together (Zhang et al. 2018);
* :func:`train_generations` (``featkd born-again``) - Born-Again Networks and their ensembles
  (Furlanello et al. 2018);
* :class:`AdversarialKD` (``featkd adversarial``) - a student against a conditional logit
  discriminator (Xu, Hsu and Huang 2018).
"""

from featkd.strategies.adversarial import (AdversarialConfig, AdversarialKD, LogitDiscriminator, discriminator_loss,
                                          generator_loss)
from featkd.strategies.born_again import BornAgainConfig, train_generations
from featkd.strategies.dml import DeepMutualLearning, DMLConfig, PeerTermConfig, mutual_loss
from featkd.strategies.registry import STRATEGIES, Strategy, register

__all__ = [
    "STRATEGIES",
    "AdversarialConfig",
    "AdversarialKD",
    "BornAgainConfig",
    "DMLConfig",
    "DeepMutualLearning",
    "LogitDiscriminator",
    "PeerTermConfig",
    "Strategy",
    "discriminator_loss",
    "generator_loss",
    "mutual_loss",
    "register",
    "train_generations",
]
