"""Adversarial KD with a conditional discriminator (Xu, Hsu and Huang 2018, arXiv:1709.00513).

The student plays the generator of logits. A discriminator, a small residual MLP on logit
vectors, tells the teacher's logits (real) from the student's (fake). It is conditional in
the auxiliary-classifier way: its output has C + 2 units,

* units ``[0, C)``: class logits; trained with cross-entropy to name the true label of both
  real and fake inputs (AC-GAN), and the student is trained so that its logits are classified
  as the true label — the label information the discriminator is conditioned on;
* units ``C`` and ``C + 1``: the source, ``fake`` and ``real``. With ``objective="bce"`` the
  source loss is the cross-entropy of a 2-way softmax over these units, which is the binary
  cross-entropy of sigmoid(real unit - fake unit); with ``objective="lsgan"`` the two units are
  regressed onto the one-hot source target with a halved squared error (Mao et al.'s least
  squares GAN with targets 0/1, written per unit).

Updates alternate each step: the discriminator with the student fixed (student logits
detached), then the student with the discriminator fixed. The student minimises
``adv_weight * (source loss as "real" + class_weight * class loss) + l1_weight * |z_s - z_t|_1
+ ce_weight * CE(z_s, y)``; the L1 term is the l1 norm of the logit difference per sample
(summed over classes), averaged over the batch. With per-token logits (a language model; the batch read
through a :class:`featkd.BatchFormat`) every valid token is one sample of this game, as in the per-token KD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from featkd.batches import IMAGES, BatchFormat
from featkd.config import OptimConfig
from featkd.engine import MethodBase, Precision
from featkd.functional import cross_entropy
from featkd.model_outputs import logits_of, token_rows
from featkd.strategies.registry import Strategy, register

OBJECTIVES = ("bce", "lsgan")


def source_loss(d_out: torch.Tensor, real: bool, num_classes: int, objective: str = "bce") -> torch.Tensor:
    """The real/fake part of the discriminator's objective on its (B, C+2) output, mean over the batch.

    ``real`` says which source the loss pushes ``d_out`` towards (the discriminator uses ``True``
    for the teacher's logits and ``False`` for the student's; the student uses ``True``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown adversarial objective {objective!r}; expected one of {OBJECTIVES}.")
    if d_out.shape[1] != num_classes + 2:
        raise ValueError(f"discriminator output has {d_out.shape[1]} units; expected C + 2 = {num_classes + 2} "
                         f"(C = {num_classes} class units, then fake and real).")
    source = d_out[:, num_classes:]
    target = torch.full((d_out.shape[0],), int(real), dtype=torch.long, device=d_out.device)
    if objective == "bce":
        return F.cross_entropy(source, target)
    return 0.5 * (source - F.one_hot(target, 2).to(source.dtype)).pow(2).sum(1).mean()


def class_loss(d_out: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The auxiliary-classifier part: cross-entropy of the C class units against the labels.

    Unlabelled samples (label -1) are left out; a batch with none labelled gives 0.
    """
    return cross_entropy(d_out[:, :num_classes], targets)


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, targets: torch.Tensor, num_classes: int,
                       objective: str = "bce", class_weight: float = 1.0) -> torch.Tensor:
    """The discriminator's loss: teacher logits are real, student logits fake, both classified."""
    return (source_loss(d_real, True, num_classes, objective) + source_loss(d_fake, False, num_classes, objective)
            + class_weight * (class_loss(d_real, targets, num_classes) + class_loss(d_fake, targets, num_classes)))


def generator_loss(d_fake: torch.Tensor, targets: torch.Tensor, num_classes: int, objective: str = "bce",
                   class_weight: float = 1.0) -> torch.Tensor:
    """The student's adversarial loss: its logits should pass as real and be classified correctly."""
    return source_loss(d_fake, True, num_classes, objective) + class_weight * class_loss(d_fake, targets, num_classes)


class ResidualBlock(nn.Module):
    """``x + W2 relu(W1 relu(x))``: a pre-activation residual block of two linear layers."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


class LogitDiscriminator(nn.Module):
    """Residual MLP from a C-dimensional logit vector to C + 2 outputs (C classes, then fake, real)."""

    def __init__(self, num_classes: int, width: int = 128, blocks: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Linear(num_classes, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.head = nn.Linear(width, num_classes + 2)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.blocks(self.stem(logits))))


class AdversarialKD(MethodBase):
    """A ``featkd.engine`` Method: student against a fixed teacher and a conditional discriminator."""

    def __init__(self, student: nn.Module, teacher: nn.Module, discriminator: LogitDiscriminator,
                 student_optimizer: torch.optim.Optimizer, discriminator_optimizer: torch.optim.Optimizer,
                 student_scheduler=None, discriminator_scheduler=None, objective: str = "bce",
                 adv_weight: float = 1.0, class_weight: float = 1.0, l1_weight: float = 1.0, ce_weight: float = 0.0,
                 precision: Precision | None = None, batch_format: BatchFormat = IMAGES):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown adversarial objective {objective!r}; expected one of {OBJECTIVES}.")
        # fit logs the student optimiser's learning rate
        super().__init__(student_optimizer, [student_scheduler, discriminator_scheduler], precision)
        self.student, self.teacher, self.discriminator = student, teacher, discriminator
        self.student_optimizer, self.discriminator_optimizer = student_optimizer, discriminator_optimizer
        self.objective = objective
        self.adv_weight, self.class_weight = adv_weight, class_weight
        self.l1_weight, self.ce_weight = l1_weight, ce_weight
        self.num_classes = discriminator.num_classes
        self.batch_format = batch_format
        self.teacher.requires_grad_(False)

    def _logits(self, x, y):
        """(student logits with graph, teacher logits, targets): one row per sample, or per valid token."""
        mask = self.batch_format.mask_of(x)
        with torch.no_grad():
            z_t = logits_of(self.batch_format.call(self.teacher, x, "teacher"))
        z_s, y = token_rows(logits_of(self.batch_format.call(self.student, x)), mask, y)
        return z_s.float(), token_rows(z_t, mask)[0].float(), y

    def train_step(self, x, y: torch.Tensor, step: int, indices=None) -> dict[str, float]:
        """Discriminator step on detached student logits, then the student step against the updated one."""
        self.teacher.eval()
        self.student.train()
        self.discriminator.train()
        with self.precision.autocast():
            z_s, z_t, y = self._logits(x, y)
            d_loss = discriminator_loss(self.discriminator(z_t), self.discriminator(z_s.detach()), y,
                                        self.num_classes, self.objective, self.class_weight)
        self.precision.backward_step(d_loss, self.discriminator_optimizer)

        self.discriminator.requires_grad_(False)  # fixed while the student learns against it
        try:
            with self.precision.autocast():
                adv = generator_loss(self.discriminator(z_s), y, self.num_classes, self.objective, self.class_weight)
                l1 = (z_s - z_t).abs().sum(1).mean()
                ce = cross_entropy(z_s, y)
                s_loss = self.adv_weight * adv + self.l1_weight * l1 + self.ce_weight * ce
            self.precision.backward_step(s_loss, self.student_optimizer)
        finally:
            self.discriminator.requires_grad_(True)
        return {"disc": d_loss.item(), "adv": adv.item(), "l1": l1.item(), "ce": ce.item(), "total": s_loss.item()}

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def state_parts(self) -> dict:
        return {"student": self.student, "discriminator": self.discriminator,
                "student_optimizer": self.student_optimizer, "discriminator_optimizer": self.discriminator_optimizer,
                "schedulers": self.schedulers, "precision": self.precision}


@dataclass
class DiscriminatorConfig:
    """The residual MLP on logits: hidden ``width`` and number of residual ``blocks``."""

    width: int = field(default=128, metadata={"min": 1})
    blocks: int = field(default=2, metadata={"min": 0})


@dataclass
class AdversarialConfig:
    """The ``adversarial:`` section; the student also uses the top-level ``ce_weight`` (labels).

    ``optim`` is the discriminator's optimiser (the student's is the top-level ``optim``);
    both follow the top-level ``schedule``.
    """

    objective: str = field(default="bce", metadata={"choices": OBJECTIVES})
    adv_weight: float = 1.0
    class_weight: float = 1.0
    l1_weight: float = 1.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, weight_decay=0.0))


def _check(cfg, adv: AdversarialConfig) -> None:
    from featkd.config import ConfigError

    if cfg.teacher is None or not cfg.teacher.checkpoint or cfg.student is None:
        raise ConfigError("featkd adversarial needs teacher.checkpoint (the last.pt of a 'featkd train' run) "
                          "and student.name")


def _train(run, cfg, adv: AdversarialConfig) -> list[dict]:
    """``featkd adversarial``: the student, the teacher and the discriminator from the config, trained in ``run``."""
    import dataclasses

    from featkd import runs
    from featkd.checkpoint import model_record
    from featkd.teachers import load_teacher

    teacher, _ = load_teacher(cfg.teacher.checkpoint, run.device, run.info)
    student = runs.build_model(cfg.student.name, cfg.student.options, run.info, run.device, cfg.channels_last)
    discriminator = LogitDiscriminator(run.info.num_classes, adv.discriminator.width,
                                       adv.discriminator.blocks).to(run.device)
    student_opt, student_sched = runs.build_optimization(cfg, student.parameters())
    disc_cfg = dataclasses.replace(cfg, optim=adv.optim)  # the same schedule, the discriminator's optimiser
    disc_opt, disc_sched = runs.build_optimization(disc_cfg, discriminator.parameters())
    method = AdversarialKD(student, teacher, discriminator, student_opt, disc_opt, student_sched, disc_sched,
                           objective=adv.objective, adv_weight=adv.adv_weight, class_weight=adv.class_weight,
                           l1_weight=adv.l1_weight, ce_weight=cfg.ce_weight, precision=Precision(cfg.amp, run.device),
                           batch_format=run.batch_format)
    return runs.fit_run(run, method, {"student": model_record(cfg.student.name, cfg.student.options, run.info)})


register(Strategy("adversarial", "adversarial", AdversarialConfig, _train, lambda cfg, adv: cfg.student.name, _check))
