"""Other ways to move knowledge between networks, as ``featkd.engine`` Methods.

* :class:`DeepMutualLearning` (``featkd dml``) - K peers trained together (Zhang et al. 2018);
* :func:`train_generations` (``featkd born-again``) - Born-Again Networks and their ensembles
  (Furlanello et al. 2018);
* :class:`AdversarialKD` (``featkd adversarial``) - a student against a conditional logit
  discriminator (Xu, Hsu and Huang 2018).
"""

from featkd.strategies.adversarial import AdversarialKD, LogitDiscriminator, discriminator_loss, generator_loss
from featkd.strategies.born_again import train_generations
from featkd.strategies.dml import DeepMutualLearning, PeerTermConfig, mutual_loss

__all__ = [
    "AdversarialKD",
    "DeepMutualLearning",
    "LogitDiscriminator",
    "PeerTermConfig",
    "discriminator_loss",
    "generator_loss",
    "mutual_loss",
    "train_generations",
]
