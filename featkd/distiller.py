"""``Distiller``: a frozen teacher, a student and named loss terms between their layers.

>>> distiller = featkd.Distiller(teacher, student, terms=[
...     featkd.Term("group2", loss="at", weight=1e3),
...     featkd.Term("group3", loss="nst", weight=50, options={"kernel": "poly"}),
... ], kd={"loss": "kd", "weight": 16, "T": 4})
>>> distiller.setup(x[:2])                       # dry run: shapes, adapters, loss parameters
>>> optimizer = build_optimizer(distiller.trainable_parameters())
>>> logits, losses = distiller(x, y)             # losses: ce, kd, at:group2, nst:group3, total
>>> losses["total"].backward()

Features come from forward hooks (:class:`featkd.FeatureExtractor`), so no model
is rewritten and the names are those of ``model.named_modules()`` (``module.``
prefixes of DDP-wrapped models are handled by the capture). The teacher is
frozen: its parameters do not require grad, it stays in eval mode even when
``distiller.train()`` is called, it runs under ``no_grad`` and its features are
detached. Every value of the returned loss dict is already weighted, so the
terms add up to ``total``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd.hooks import FeatureExtractor
from featkd.functional import cross_entropy

__all__ = ["Distiller", "Term", "Warmup", "FeatureAdapter", "TEACHER_BN_MODES", "teacher_bn_mode"]


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Warmup:
    """A loss weight that ramps linearly from 0 to ``value`` over ``epochs`` epochs or ``steps`` steps.

    Several papers warm the feature loss up this way. Epochs may be fractional
    (the training method passes ``step / steps_per_epoch``). Called with no
    progress information (e.g. outside training) it gives the full ``value``.
    """

    value: float
    epochs: float | None = None
    steps: int | None = None

    def __post_init__(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"Warmup needs exactly one of epochs= or steps=, got epochs={self.epochs}, steps={self.steps}")
        length = self.epochs if self.epochs is not None else self.steps
        if length <= 0:
            raise ValueError(f"Warmup length must be positive, got {length}")

    def __call__(self, step: int | None = None, epoch: float | None = None) -> float:
        if self.steps is not None:
            progress = None if step is None else step / self.steps
        else:
            progress = None if epoch is None else epoch / self.epochs
        return self.value if progress is None else self.value * min(max(progress, 0.0), 1.0)


def _weight_at(weight: float | Warmup, step: int | None, epoch: float | None) -> float:
    return weight(step, epoch) if callable(weight) else float(weight)


# --------------------------------------------------------------------------- terms and adapters


@dataclass
class Term:
    """One feature-transfer term.

    * ``teacher`` / ``student``: layer name(s) (``featkd layers <model>`` lists them).
      ``student`` defaults to the teacher's names (same architecture family). With
      lists, the loss is applied to each (student, teacher) pair and the term is
      the sum (AT over the three WRN groups with one weight), except for losses
      defined on several layers at once (``fsp``, or a module with
      ``multi_layer = True``), which get the lists.
    * ``loss``: a feature-loss name (``nst``, ``at``, ``gram``, ``fsp``, ``hint``;
      built with ``options`` by :func:`featkd.losses.build_feature_loss`) or an
      ``nn.Module`` taking ``(f_s, f_t)``.
    * ``weight``: a float or a schedule such as :class:`Warmup`.
    * ``adapter``: ``"auto"`` (default) adds one only if the loss cannot compare
      the shapes as they are — a 1×1 conv + BN when channel counts differ, average
      pooling / bilinear interpolation when spatial sizes differ; ``"conv"`` always
      adds the 1×1 conv; ``None`` never adds one; or an ``nn.Module`` of your own.
      Adapters are trained with the student.
    * ``name``: the key of this term in the loss dict (default ``"<loss>:<student layer>"``).
    """

    teacher: str | Sequence[str]
    student: str | Sequence[str] | None = None
    loss: str | nn.Module = "at"
    weight: float | Warmup = 1.0
    name: str | None = None
    adapter: str | nn.Module | None = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.teacher_layers = [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)
        student = self.teacher if self.student is None else self.student
        self.student_layers = [student] if isinstance(student, str) else list(student)
        if len(self.teacher_layers) != len(self.student_layers) or not self.teacher_layers:
            raise ValueError(f"term {self.key!r}: teacher layers {self.teacher_layers} and student layers "
                             f"{self.student_layers} must be non-empty lists of the same length")
        if isinstance(self.loss, nn.Module) and len(self.student_layers) > 1 and not self.multi_layer:
            raise ValueError(f"term {self.key!r}: a loss module is shared by all its layer pairs; give the loss "
                             "by name (one module is built per pair) or use one Term per pair")
        if isinstance(self.loss, nn.Module) and self.options:
            raise ValueError(f"term {self.key!r}: options {self.options} only apply to a loss given by name")
        if not (self.adapter in (None, "auto", "conv") or isinstance(self.adapter, nn.Module)):
            raise ValueError(f"term {self.key!r}: adapter must be 'auto', 'conv', None or an nn.Module, "
                             f"got {self.adapter!r}")

    @property
    def multi_layer(self) -> bool:
        """Whether the loss takes the lists of layers at once (FSP) rather than one pair at a time."""
        if isinstance(self.loss, str):
            return self.loss == "fsp"
        return bool(getattr(self.loss, "multi_layer", False)) or type(self.loss).__name__ == "FSPLoss"

    @property
    def loss_name(self) -> str:
        return self.loss if isinstance(self.loss, str) else type(self.loss).__name__

    @property
    def key(self) -> str:
        return self.name or f"{self.loss_name}:{'+'.join(self.student_layers)}"


class FeatureAdapter(nn.Module):
    """Map a student feature map ``(B, Cs, Hs, Ws)`` to the teacher's ``(B, Ct, Ht, Wt)``.

    Channels: a 1×1 convolution followed by batch norm (FitNets/ RepDistiller's
    connector), present when ``channels=True`` or the counts differ. Spatial size:
    adaptive average pooling when the student map is larger, bilinear
    interpolation when it is smaller.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], channels: bool | None = None):
        super().__init__()
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(f"an automatic adapter needs (B, C, H, W) feature maps, got student "
                             f"{tuple(student_shape)} and teacher {tuple(teacher_shape)}")
        c_s, c_t = student_shape[1], teacher_shape[1]
        self.size = tuple(teacher_shape[2:])
        self.resize = None
        if tuple(student_shape[2:]) != self.size:
            larger = student_shape[2] >= self.size[0] and student_shape[3] >= self.size[1]
            self.resize = "pool" if larger else "interpolate"
        use_conv = c_s != c_t if channels is None else channels
        self.conv = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t)) if use_conv else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.resize == "pool":
            f = F.adaptive_avg_pool2d(f, self.size)
        elif self.resize == "interpolate":
            f = F.interpolate(f, size=self.size, mode="bilinear", align_corners=False)
        return self.conv(f) if self.conv is not None else f

    def extra_repr(self) -> str:
        return f"resize={self.resize}, size={self.size}"


# --------------------------------------------------------------------------- the teacher's batch norm

TEACHER_BN_MODES = ("eval", "batch_stats")


@contextlib.contextmanager
def teacher_bn_mode(teacher: nn.Module, mode: str) -> Iterator[None]:
    """Run the frozen ``teacher``'s forwards inside this block with its BN layers in ``mode``.

    ``"eval"``: as they are (the teacher is in eval mode: its running statistics). ``"batch_stats"``:
    every BN layer normalises each batch with that batch's own statistics, as the official NST code ran
    its teacher, and its running statistics (and batch count) are left untouched.
    """
    if mode not in TEACHER_BN_MODES:
        raise ValueError(f"teacher_bn must be one of {list(TEACHER_BN_MODES)}, got {mode!r}")
    batch_norms = nn.modules.batchnorm._BatchNorm
    norms = [m for m in teacher.modules() if isinstance(m, batch_norms)] if mode == "batch_stats" else []
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            # training mode with track_running_stats off: batch statistics, no running-statistics update
            m.train(True)
            m.track_running_stats = False
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = tracking


# --------------------------------------------------------------------------- the distiller


def _build_logit_loss(kd) -> tuple[nn.Module | None, float | Warmup]:
    """``kd`` as None, a name, a dict ``{loss: name, weight: w, **options}`` or a module."""
    if kd is None:
        return None, 0.0
    if isinstance(kd, nn.Module):
        return kd, 1.0
    from featkd.losses import build_logit_loss

    if isinstance(kd, str):
        return build_logit_loss(kd), 1.0
    if isinstance(kd, Mapping):
        options = dict(kd)
        name = options.pop("loss", "kd")
        weight = options.pop("weight", 1.0)
        loss = name if isinstance(name, nn.Module) else build_logit_loss(name, **options)
        return loss, weight
    raise TypeError(f"kd must be None, a loss name, a dict {{loss:, weight:, options...}} or an nn.Module; got {kd!r}")


class Distiller(nn.Module):
    """Teacher + student + named transfer terms (+ an optional logit term); see the module docstring.

    Args:
        teacher, student: any ``nn.Module`` classifiers (possibly DDP-wrapped).
        terms: :class:`Term` objects.
        kd: the logit term: ``None``, a name (``"kd"``), ``{"loss": "kd", "weight": 0.9, "T": 4}``
            or a module ``(student_logits, teacher_logits, targets)``.
        ce_weight: weight of the cross-entropy on labelled samples (targets ``-1`` are skipped).
        compile: ``torch.compile`` the student (after its hooks are registered) with these options
            (``True`` for the defaults).
        teacher_bn: ``"eval"`` (default): the teacher's BN layers use their running statistics;
            ``"batch_stats"``: they normalise each batch with its own statistics, as the official NST
            code ran its teacher, leaving the running statistics as they are (:func:`teacher_bn_mode`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, terms: Sequence[Term] = (), kd=None,
                 ce_weight: float | Warmup = 1.0, compile: bool | dict = False, teacher_bn: str = "eval"):
        super().__init__()
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"teacher_bn must be one of {list(TEACHER_BN_MODES)}, got {teacher_bn!r}")
        self.teacher_bn = teacher_bn
        self.teacher, self.student = teacher, student
        self.terms = list(terms)
        keys = [t.key for t in self.terms]
        duplicates = sorted({k for k in keys if keys.count(k) > 1} | ({"ce", "kd", "total"} & set(keys)))
        if duplicates:
            raise ValueError(f"term names must be unique and not ce/kd/total: {duplicates}; give the terms name=...")
        self.kd_loss, self.kd_weight = _build_logit_loss(kd)
        self.ce_weight = ce_weight
        if not self.terms and self.kd_loss is None:
            raise ValueError("nothing to distill: give at least one Term or a kd loss")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_layers = list(dict.fromkeys(name for t in self.terms for name in t.teacher_layers))
        student_layers = list(dict.fromkeys(name for t in self.terms for name in t.student_layers))
        self._teacher_features = FeatureExtractor(teacher, self.teacher_layers, detach=True, no_grad=True)
        self._teacher_outputs = self._teacher_features  # x -> (teacher logits, teacher features)
        # Hooks are registered on the student before torch.compile first runs it, so they are traced in.
        runner = student
        if compile:
            runner = torch.compile(student, **(compile if isinstance(compile, dict) else {}))
        self._student_features = FeatureExtractor(runner, student_layers)
        self.adapters = nn.ModuleList()
        self.term_losses = nn.ModuleList()
        self.is_setup = False

    # -- setup ------------------------------------------------------------------------

    @torch.no_grad()
    def setup(self, example_x: torch.Tensor) -> Distiller:
        """Dry-run both networks on ``example_x`` (two samples suffice) and build adapters and losses.

        Call it before building the optimizer so that adapter and loss parameters
        are part of :meth:`trainable_parameters`. Running twice is a no-op.
        """
        if self.is_setup:
            return self
        was_training = self.student.training
        self.student.eval()  # the dry run must not move BN running statistics
        try:
            with teacher_bn_mode(self.teacher, self.teacher_bn):
                _, f_t = self._teacher_features(example_x)
            _, f_s = self._student_features(example_x)
        finally:
            self.student.train(was_training)
        device = next(self.student.parameters()).device
        for term in self.terms:
            s_shapes = [tuple(f_s[name].shape) for name in term.student_layers]
            t_shapes = [tuple(f_t[name].shape) for name in term.teacher_layers]
            if term.multi_layer:
                pairs = [self._build_pair(term, tuple(s_shapes), tuple(t_shapes), term.student_layers,
                                          term.teacher_layers, device, multi=True)]
            else:
                pairs = [self._build_pair(term, s, t, [s_name], [t_name], device)
                         for s, t, s_name, t_name in zip(s_shapes, t_shapes, term.student_layers, term.teacher_layers)]
            self.adapters.append(nn.ModuleList(adapter for adapter, _ in pairs))
            self.term_losses.append(nn.ModuleList(loss.to(device) for _, loss in pairs))
        if self.kd_loss is not None:
            self.kd_loss.to(device)
        self.is_setup = True
        return self

    def _build_pair(self, term: Term, s_shape: tuple, t_shape: tuple, s_names: list[str], t_names: list[str],
                    device: torch.device, multi: bool = False) -> tuple[nn.Module, nn.Module]:
        """The adapter and loss module for one (student, teacher) layer pair (or the lists, for FSP)."""
        described = (f"term {term.key!r} ({term.loss_name}): student layer(s) {s_names} give {s_shape}, "
                     f"teacher layer(s) {t_names} give {t_shape}")
        if term.adapter is None or term.adapter == "auto":
            adapter = nn.Identity()
        elif multi:
            raise ValueError(f"{described}: adapter={term.adapter!r} does not apply to a loss over several layers")
        elif term.adapter == "conv":
            adapter = FeatureAdapter(s_shape, t_shape, channels=True)
        else:
            adapter = term.adapter
        adapter.to(device)
        if not isinstance(adapter, nn.Identity):
            with torch.no_grad():
                s_shape = tuple(adapter(torch.zeros(s_shape, device=device)).shape)
        try:
            return adapter, self._loss(term, s_shape, t_shape)
        except ValueError as error:
            first_error = error
        if term.adapter == "auto" and not multi and len(s_shape) == 4 and len(t_shape) == 4:
            adapter = FeatureAdapter(s_shape, t_shape).to(device)
            adapted = (s_shape[0], t_shape[1] if adapter.conv is not None else s_shape[1], *t_shape[2:])
            try:
                return adapter, self._loss(term, adapted, t_shape)
            except ValueError as error:
                if str(error) != str(first_error):
                    raise ValueError(f"{described}: {first_error}; with an automatic adapter to {adapted}: "
                                     f"{error}") from None
        raise ValueError(f"{described}: {first_error}") from None

    @staticmethod
    def _loss(term: Term, s_shape, t_shape) -> nn.Module:
        if isinstance(term.loss, nn.Module):
            check = getattr(term.loss, "check_shapes", None)
            if check is not None:
                check(s_shape, t_shape)
            return term.loss
        from featkd.losses import build_feature_loss

        return build_feature_loss(term.loss, s_shape, t_shape, **term.options)

    # -- training ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> Distiller:
        """Set the student (and adapters, losses) to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, adapter and loss parameters (the teacher's are frozen), each once."""
        if not self.is_setup:
            raise RuntimeError("call distiller.setup(example_x) first: adapters and loss parameters are built there")
        params: dict[int, nn.Parameter] = {}
        for module in (self.student, self.adapters, self.term_losses, self.kd_loss):
            if module is not None:
                params.update((id(p), p) for p in module.parameters() if p.requires_grad)
        return list(params.values())

    def share_teacher(self, teacher_outputs) -> None:
        """Take the teacher's ``(logits, features)`` from ``teacher_outputs(x)`` instead of running it.

        For several students trained against one teacher forward per batch (:mod:`featkd.sweep`):
        the features must hold :attr:`teacher_layers`. This distiller's own teacher hooks are
        removed, so the teacher's forward stores each layer once, for whoever ran it. Call it after
        :meth:`setup` (the dry run needs the real teacher).
        """
        if not self.is_setup:
            raise RuntimeError("call distiller.setup(example_x) before share_teacher: the dry run needs the teacher")
        self._teacher_features.remove()
        self._teacher_outputs = teacher_outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, step: int | None = None,
                epoch: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the weighted losses ``{"ce", "kd", <term names>..., "total"}``.

        ``y`` may hold ``-1`` for unlabelled samples (no CE for them; KD and feature
        terms use every sample); without ``y`` there is no CE term. ``step`` and
        ``epoch`` drive weight schedules (full weights when omitted).
        """
        if not self.is_setup:
            self.setup(x[:2])
        with teacher_bn_mode(self.teacher, self.teacher_bn):
            teacher_logits, f_t = self._teacher_outputs(x)
        student_logits, f_s = self._student_features(x)
        losses: dict[str, torch.Tensor] = {}
        ce_weight = _weight_at(self.ce_weight, step, epoch)
        if y is not None and ce_weight:
            losses["ce"] = ce_weight * cross_entropy(student_logits, y)
        if self.kd_loss is not None:
            losses["kd"] = _weight_at(self.kd_weight, step, epoch) * self.kd_loss(student_logits, teacher_logits, y)
        for term, adapters, pair_losses in zip(self.terms, self.adapters, self.term_losses):
            s = [f_s[name] for name in term.student_layers]
            t = [f_t[name] for name in term.teacher_layers]
            if term.multi_layer:
                value = pair_losses[0](s, t)
            else:
                value = sum(loss(adapter(f), g) for adapter, loss, f, g in zip(adapters, pair_losses, s, t))
            losses[term.key] = _weight_at(term.weight, step, epoch) * value
        losses["total"] = sum(losses.values()) if losses else student_logits.new_zeros(())
        return student_logits, losses

    def remove_hooks(self) -> None:
        """Remove the capture hooks from both networks (the distiller cannot be used afterwards)."""
        self._teacher_features.remove()
        self._student_features.remove()

    def extra_repr(self) -> str:
        terms = ", ".join(f"{t.key}×{t.weight}" for t in self.terms)
        return (f"terms=[{terms}], kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"teacher_bn={self.teacher_bn}")
