"""``Distiller``: a frozen teacher, a student and named loss terms between their layers.

>>> distiller = featkd.Distiller(teacher, student, terms=[
...     featkd.Term("group2", loss="at", weight=1e3),
...     featkd.Term("group3", loss="nst", weight=50, options={"kernel": "poly"}),
... ], kd={"loss": "kd", "weight": 16, "T": 4})
>>> distiller.setup(x[:2])                       # dry run: shapes, layouts, adapters, loss parameters
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

Teacher and student may be any backbones: each captured feature's layout (channels-first or -last
maps, tokens) is resolved at the dry run (:mod:`featkd.layouts`) and the losses see channels-first
views, with an adapter between tokens and maps where the shapes need one. A teacher that expects
another input normalisation than the student gets the batch converted (``teacher_normalization``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from featkd.calibration import RelativeToCE
from featkd.functional import cross_entropy
from featkd.hooks import FeatureExtractor
from featkd.layer_info import describe_features
from featkd.layer_specs import LayerKeyError, unwrap
from featkd.losses import BatchContext, build_logit_loss
from featkd.models import check_input, input_normalization
from featkd.terms import Term, Warmup, build_term_pairs, call_loss, check_weight, view, weight_at

__all__ = ["Distiller", "InputConversion", "NOT_SET_UP", "TEACHER_BN_MODES", "teacher_bn_mode"]

# Why a Distiller refuses to run or hand out its parameters before setup (setting itself up on the first
# batch would leave the adapters and loss parameters out of an optimiser built on the student's parameters).
NOT_SET_UP = ("the Distiller is not set up: its adapters and loss parameters are built in setup and must be in the "
              "optimiser; call distiller.setup(example_x), then build the optimiser on "
              "distiller.trainable_parameters()")


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


# --------------------------------------------------------------------------- the teacher's input normalisation

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def _normalization(value, model: nn.Module, role: str) -> Normalization | None:
    """``(mean, std)`` per channel from ``value``: None, ``(mean, std)``, or ``"pretrained_cfg"`` (the model's)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "pretrained_cfg":
            raise ValueError(f"{role}_normalization must be (mean, std) or 'pretrained_cfg', got {value!r}")
        found = input_normalization(model)
        if found is None:
            raise ValueError(f"{role}_normalization='pretrained_cfg': the {role} ({type(unwrap(model)).__name__}) "
                             f"records no mean/std; give {role}_normalization=(mean, std)")
        return found
    try:
        mean, std = (tuple(float(v) for v in (part if isinstance(part, (list, tuple)) else [part])) for part in value)
    except (TypeError, ValueError):
        raise ValueError(f"{role}_normalization must be (mean, std), one value per channel, got {value!r}") from None
    # a NaN, zero or infinite std (or a non-finite mean) would feed the teacher NaN or a blank batch
    if len(mean) != len(std) or not mean or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"{role}_normalization: mean {mean} and std {std} need one value per channel, finite "
                         "means and finite stds > 0")
    return mean, std


def _per_channel(values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


class InputConversion(nn.Module):
    """A batch normalised with ``student`` ``(mean, std)`` as the ``teacher`` normalisation would give it:
    ``(x * std_s + mean_s - mean_t) / std_t`` per channel; the batch as it is when either is None or they agree.
    ``normalizations`` is ``(student, teacher)`` when there is something to convert, else None."""

    def __init__(self, student: Normalization | None = None, teacher: Normalization | None = None):
        super().__init__()
        self.normalizations = (student, teacher) if None not in (student, teacher) and student != teacher else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalizations is None:
            return x
        (mean_s, std_s), (mean_t, std_t) = self.normalizations
        if x.dim() < 2 or {len(mean_s), len(mean_t)} - {1, x.shape[1]}:
            raise ValueError(f"the normalisations (student mean {mean_s}, teacher mean {mean_t}) do not fit a batch "
                             f"of shape {tuple(x.shape)}: give one value per input channel")
        return (x * _per_channel(std_s, x) + _per_channel(mean_s, x) - _per_channel(mean_t, x)) / _per_channel(std_t, x)

    def extra_repr(self) -> str:
        return f"normalizations={self.normalizations}"


# --------------------------------------------------------------------------- the distiller


def _extractor(role: str, model: nn.Module, layers: list[str], **options) -> FeatureExtractor:
    """A :class:`FeatureExtractor` whose unknown-layer error says which network lacks the layer."""
    try:
        return FeatureExtractor(model, layers, **options)
    except LayerKeyError as error:
        raise LayerKeyError(f"{role} {type(unwrap(model)).__name__}: {error}") from None


def _build_logit_loss(kd) -> tuple[nn.Module | None, float | Warmup]:
    """``kd`` as None, a name, a dict ``{loss: name, weight: w, **options}`` or a module."""
    if kd is None:
        return None, 0.0
    if isinstance(kd, nn.Module):
        return kd, 1.0
    if isinstance(kd, str):
        return build_logit_loss(kd), 1.0
    if isinstance(kd, Mapping):
        options = dict(kd)
        name = options.pop("loss", "kd")
        weight = options.pop("weight", 1.0)
        if isinstance(name, nn.Module):
            return name, weight
        try:
            return build_logit_loss(name, **options), weight
        except ValueError as error:
            raise ValueError(f"kd loss {name!r} with options {options}: {error}") from None
    raise TypeError(f"kd must be None, a loss name, a dict {{loss:, weight:, options...}} or an nn.Module; got {kd!r}")


class Distiller(nn.Module):
    """Teacher + student + named transfer terms (+ an optional logit term); see the module docstring.

    Args:
        teacher, student: any ``nn.Module`` classifiers (possibly DDP-wrapped).
        terms: :class:`featkd.Term` objects.
        kd: the logit term: ``None``, a name (``"kd"``), ``{"loss": "kd", "weight": 0.9, "T": 4}``
            or a module ``(student_logits, teacher_logits, targets)``.
        ce_weight: weight of the cross-entropy on labelled samples (targets ``-1`` are skipped).
        compile: ``torch.compile`` the student (after its hooks are registered) with these options
            (``True`` for the defaults).
        teacher_bn: ``"eval"`` (default): the teacher's BN layers use their running statistics;
            ``"batch_stats"``: they normalise each batch with its own statistics, as the official NST
            code ran its teacher, leaving the running statistics as they are (:func:`teacher_bn_mode`).
        student_normalization, teacher_normalization: the per-channel ``(mean, std)`` (on the images'
            0..1 scale) the batch is normalised with, and the one the teacher expects, or
            ``"pretrained_cfg"`` for what a timm model records. When both are given and differ, the
            teacher gets ``(x * std_s + mean_s - mean_t) / std_t``; neither: the batch as it is.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, terms: Sequence[Term] = (), kd=None,
                 ce_weight: float | Warmup = 1.0, compile: bool | dict = False, teacher_bn: str = "eval",
                 student_normalization=None, teacher_normalization=None):
        super().__init__()
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"teacher_bn must be one of {list(TEACHER_BN_MODES)}, got {teacher_bn!r}")
        self.teacher_bn = teacher_bn
        normalizations = (_normalization(student_normalization, student, "student"),
                          _normalization(teacher_normalization, teacher, "teacher"))
        if (normalizations[0] is None) != (normalizations[1] is None):
            given, missing = ("student", "teacher") if normalizations[1] is None else ("teacher", "student")
            raise ValueError(f"{given}_normalization is given but {missing}_normalization is not: converting the "
                             f"batch for the teacher needs both (the batch's and the teacher's mean/std)")
        self.teacher_input = InputConversion(*normalizations)  # the batch as the teacher expects it
        self.teacher, self.student = teacher, student
        self.terms = list(terms)
        for term in self.terms:  # "group*" -> group1, group2, group3 (module order), before any name is used
            term.expand_globs(teacher, student)
        keys = [t.key for t in self.terms]
        duplicates = sorted({k for k in keys if keys.count(k) > 1} | ({"ce", "kd", "total"} & set(keys)))
        if duplicates:
            raise ValueError(f"term names must be unique and not ce/kd/total: {duplicates}; give the terms name=...")
        self.kd_loss, self.kd_weight = _build_logit_loss(kd)
        self.ce_weight = ce_weight
        check_weight(self.kd_weight, "kd weight")
        check_weight(ce_weight, "ce_weight")
        if not self.terms and self.kd_loss is None:
            raise ValueError("nothing to distill: give at least one Term or a kd loss")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_layers = list(dict.fromkeys(name for t in self.terms for name in t.teacher_layers))
        student_layers = list(dict.fromkeys(name for t in self.terms for name in t.student_layers))
        self._teacher_features = _extractor("teacher", teacher, self.teacher_layers, detach=True, no_grad=True)
        self._teacher_outputs = self._own_teacher  # x -> (teacher logits, teacher features)
        # Hooks are registered on the student before torch.compile first runs it, so they are traced in.
        runner = student
        if compile:
            runner = torch.compile(student, **(compile if isinstance(compile, dict) else {}))
        self._student_features = _extractor("student", runner, student_layers)
        self.adapters = nn.ModuleList()
        self.term_losses = nn.ModuleList()
        self.is_setup = False

    # -- the teacher's input -----------------------------------------------------------

    @property
    def input_normalizations(self) -> tuple[Normalization, Normalization] | None:
        """(the batch's, the teacher's) normalisation when the batch is converted for the teacher, else None."""
        return self.teacher_input.normalizations

    def _own_teacher(self, x: torch.Tensor):
        return self._teacher_features(self.teacher_input(x))

    # -- setup ------------------------------------------------------------------------

    @torch.no_grad()
    def setup(self, example_x: torch.Tensor) -> Distiller:
        """Dry-run both networks on ``example_x`` (two samples suffice) and build layouts, adapters and losses.

        Call it before building the optimizer so that adapter and loss parameters
        are part of :meth:`trainable_parameters`. Running twice is a no-op.
        """
        if self.is_setup:
            return self
        t_features = describe_features(self.teacher, self.teacher_layers, self.teacher_input(example_x))
        s_features = describe_features(self.student, self._student_features.layers, example_x)
        for extractor in (self._student_features, self._teacher_features):
            extractor.clear()  # their hooks stored the dry run's features too
        device = next(self.student.parameters()).device
        self._layouts = []
        for term in self.terms:
            built = build_term_pairs(term, s_features, t_features, device)
            self.adapters.append(built.adapters)
            self.term_losses.append(built.losses)
            self._layouts.append((built.student_layouts, built.teacher_layouts))
        self._multi_layer = [term.multi_layer for term in self.terms]
        if self.kd_loss is not None:
            self.kd_loss.to(device)
        self.is_setup = True
        return self

    def train(self, mode: bool = True) -> Distiller:
        """Set the student (and adapters, losses) to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, adapter and loss parameters (the teacher's are frozen), each once."""
        if not self.is_setup:
            raise RuntimeError(NOT_SET_UP)
        params: dict[int, nn.Parameter] = {}
        for module in (self.student, self.adapters, self.term_losses, self.kd_loss):
            if module is not None:
                params.update((id(p), p) for p in module.parameters() if p.requires_grad)
        return list(params.values())

    def share_teacher(self, teacher_outputs) -> None:
        """Take the teacher's ``(logits, features)`` from ``teacher_outputs(x)`` instead of running it.

        For several students trained against one teacher forward per batch (:mod:`featkd.sweep`):
        the features must hold :attr:`teacher_layers`, from the teacher run on :meth:`teacher_input`. This
        distiller's own teacher hooks are removed, so the teacher's forward stores each layer once, for
        whoever ran it. Call it after :meth:`setup` (the dry run needs the real teacher).
        """
        if not self.is_setup:
            raise RuntimeError("call distiller.setup(example_x) before share_teacher: the dry run needs the teacher")
        self._teacher_features.remove()
        self._teacher_outputs = teacher_outputs

    def loss_weights(self) -> dict[str, object]:
        """``{"kd": weight, <term key>: weight, ...}``: each loss's weight as given (a float, a schedule such as
        :class:`featkd.Warmup`, or a :class:`featkd.calibration.RelativeToCE` not yet resolved)."""
        weights = {"kd": self.kd_weight} if self.kd_loss is not None else {}
        weights.update((term.key, term.weight) for term in self.terms)
        return weights

    def set_loss_weights(self, weights: Mapping[str, object]) -> None:
        """Replace the weights of the named losses (``"kd"`` or term keys), e.g. by calibrated absolute ones."""
        unknown = sorted(set(weights) - set(self.loss_weights()))
        if unknown:
            raise KeyError(f"no loss named {unknown}; the distiller's losses: {list(self.loss_weights())}")
        for term in self.terms:
            term.weight = weights.get(term.key, term.weight)
        self.kd_weight = weights.get("kd", self.kd_weight)

    def unweighted_losses(self, x: torch.Tensor, y: torch.Tensor | None = None, *, step: int | None = None,
                          epoch: float | None = None, indices: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and each transfer loss before its weight: ``{"kd", <term names>...}`` (no CE)."""
        if not self.is_setup:
            raise RuntimeError(NOT_SET_UP)
        with teacher_bn_mode(self.teacher, self.teacher_bn):
            teacher_logits, f_t = self._teacher_outputs(x)
        student_logits, f_s = self._student_features(x)
        values: dict[str, torch.Tensor] = {}
        if self.kd_loss is not None:
            values["kd"] = self.kd_loss(student_logits, teacher_logits, y)
        context = BatchContext(y, step, epoch, indices)
        for term, multi_layer, adapters, pair_losses, (s_layouts, t_layouts) in zip(
                self.terms, self._multi_layer, self.adapters, self.term_losses, self._layouts):
            s = [view(f_s[name], layout) for name, layout in zip(term.student_layers, s_layouts)]
            t = [view(f_t[name], layout) for name, layout in zip(term.teacher_layers, t_layouts)]
            if multi_layer:
                values[term.key] = call_loss(pair_losses[0], s, t, context)
            else:
                values[term.key] = sum(call_loss(loss, adapter(f), g, context)
                                       for adapter, loss, f, g in zip(adapters, pair_losses, s, t))
        return student_logits, values

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, step: int | None = None,
                epoch: float | None = None, indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the weighted losses ``{"ce", "kd", <term names>..., "total"}``.

        ``y`` may hold ``-1`` for unlabelled samples (no CE for them; KD and feature
        terms use every sample); without ``y`` there is no CE term. ``step`` and
        ``epoch`` drive weight schedules (full weights when omitted). Losses that use the
        per-batch context (``uses_context``) receive ``y``, ``step``, ``epoch`` and the samples'
        dataset ``indices`` as a :class:`featkd.losses.BatchContext`.
        """
        check_input(self.student, x)
        if not self.is_setup:  # set up here, its adapters and loss parameters would miss the optimiser
            raise RuntimeError(NOT_SET_UP)
        weights = self.loss_weights()
        unresolved = [key for key, weight in weights.items() if isinstance(weight, RelativeToCE)]
        if unresolved:
            raise RuntimeError(f"the weights of {unresolved} are relative to the cross-entropy: resolve them with "
                               "featkd.calibration.calibrate_weights(distiller, x, y) on a training batch first")
        student_logits, values = self.unweighted_losses(x, y, step=step, epoch=epoch, indices=indices)
        losses: dict[str, torch.Tensor] = {}
        ce_weight = weight_at(self.ce_weight, step, epoch)
        if y is not None and ce_weight:
            losses["ce"] = ce_weight * cross_entropy(student_logits, y)
        for key, value in values.items():
            losses[key] = weight_at(weights[key], step, epoch) * value
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
