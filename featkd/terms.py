"""Terms: what a :class:`featkd.Distiller` transfers between which layers, and how a term's losses are built.

* :class:`Term`: a loss between student and teacher layers, its weight (a float or a :class:`Warmup`),
  its adapter and each side's layout; the config form of a Term is :class:`featkd.config.TermConfig`.
* :func:`build_term_pairs`: a term's layouts, adapters and loss modules for the features of a dry run.
  The Distiller builds its terms with it, and Deep Mutual Learning its terms between peers.

Every feature reaches its adapter and loss channels-first (:func:`featkd.layouts.to_channels_first`):
channels-last maps permuted, tokens on their grid without their prefix tokens. So the losses keep their
math whatever the backbones, and a token/map pair is one more case of the channel and size adapters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd.layouts import (CapturedFeature, Layout, canonical_shape, mask_to_channels_first, parse_layout, resolve_layout,
                            to_channels_first)
from featkd.losses import BatchContext, build_feature_loss, feature_loss_class

__all__ = ["Term", "TermModules", "Warmup", "FeatureAdapter", "build_term_pairs", "call_loss", "check_weight", "view",
           "weight_at"]


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
        if not length > 0:
            raise ValueError(f"Warmup length must be positive, got {length}")
        check_weight(self.value, "Warmup value")

    def __call__(self, step: int | None = None, epoch: float | None = None) -> float:
        if self.steps is not None:
            progress = None if step is None else step / self.steps
        else:
            progress = None if epoch is None else epoch / self.epochs
        return self.value if progress is None else self.value * min(max(progress, 0.0), 1.0)


def check_weight(weight: Any, what: str) -> None:
    """Refuse a negative (or NaN) loss weight, which would maximise its loss; 0 switches the loss off. A
    schedule checks its own values (:class:`Warmup`); a callable of your own is yours to check."""
    if isinstance(weight, (int, float)) and not weight >= 0:
        raise ValueError(f"{what} must be >= 0 (0 switches the loss off; a negative weight maximises it), "
                         f"got {weight!r}")


def weight_at(weight: float | Warmup, step: int | None, epoch: float | None) -> float:
    return weight(step, epoch) if callable(weight) else float(weight)


# --------------------------------------------------------------------------- terms and adapters


@dataclass
class Term:
    """One feature-transfer term of a :class:`featkd.Distiller`: a loss between student and teacher layers.

    * ``teacher`` / ``student``: layer name(s) (``featkd layers <model>`` lists them).
      ``student`` defaults to the teacher's names (same architecture family). With
      lists, the loss is applied to each (student, teacher) pair and the term is
      the sum (AT over the three WRN groups with one weight), except for losses
      defined on several layers at once (registered ``multi_layer``, as ``fsp``, or a
      module with ``multi_layer = True``), which get the lists.
    * ``loss``: a feature-loss name (``featkd.losses.feature_loss_names()``; built with
      ``options`` by :func:`featkd.losses.build_feature_loss`) or an ``nn.Module`` taking
      ``(f_s, f_t)`` (or ``(f_s, f_t, context)`` with ``uses_context = True``).
    * ``weight``: a float or a schedule such as :class:`Warmup`.
    * ``adapter``: ``"auto"`` (default) adds one only if the loss cannot compare
      the shapes as they are — a 1×1 conv + BN when channel counts differ, average
      pooling / bilinear interpolation when spatial sizes differ; ``"conv"`` always
      adds the 1×1 conv; ``None`` never adds one; or an ``nn.Module`` of your own.
      Adapters are trained with the student.
    * ``name``: the key of this term in the loss dict (default ``"<loss>:<student layer>"``).
    * ``student_layout`` / ``teacher_layout``: each side's layout (:func:`featkd.layouts.parse_layout`:
      ``"NCHW"``, ``"NHWC"``, ``"NLC"``/``"tokens"``, ``"NCL"``, or ``{"kind": "NLC", "prefix_tokens": 1,
      "tokens": "prefix"}``); ``layout`` sets both. Left out, the layout is the one the model states
      (:mod:`featkd.models.stated_layouts`), else the only reading of the shape; a shape that reads several ways
      raises with the choices. A given layout that contradicts the model's (or every reading of the shape)
      raises with both readings. ``options={"layout": ...}`` is the older spelling of ``layout``.
    """

    teacher: str | Sequence[str]
    student: str | Sequence[str] | None = None
    loss: str | nn.Module = "at"
    weight: float | Warmup = 1.0
    name: str | None = None
    adapter: str | nn.Module | None = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    layout: str | Mapping | Layout | None = None
    student_layout: str | Mapping | Layout | None = None
    teacher_layout: str | Mapping | Layout | None = None

    def __post_init__(self):
        self.teacher_layers = [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)
        student = self.teacher if self.student is None else self.student
        self.student_layers = [student] if isinstance(student, str) else list(student)
        if not self.teacher_layers or not self.student_layers or (
                len(self.teacher_layers) != len(self.student_layers) and not self.has_globs):
            raise ValueError(f"term {self.key!r}: teacher layers {self.teacher_layers} and student layers "
                             f"{self.student_layers} must be non-empty lists of the same length")
        if isinstance(self.loss, nn.Module) and len(self.student_layers) > 1 and not self.multi_layer:
            raise ValueError(f"term {self.key!r}: a loss module is shared by all its layer pairs; give the loss "
                             "by name (one module is built per pair) or use one Term per pair")
        if isinstance(self.loss, nn.Module) and self.options:
            raise ValueError(f"term {self.key!r}: options {self.options} only apply to a loss given by name")
        check_weight(self.weight, f"term {self.key!r}: weight")
        if not (self.adapter in (None, "auto", "conv") or isinstance(self.adapter, nn.Module)):
            raise ValueError(f"term {self.key!r}: adapter must be 'auto', 'conv', None or an nn.Module, "
                             f"got {self.adapter!r}")
        both = self.layout
        if "layout" in self.options:  # the older spelling: the losses see channels-first features now
            if both is not None and both != self.options["layout"]:
                raise ValueError(f"term {self.key!r}: layout={both!r} and options.layout={self.options['layout']!r} "
                                 "disagree; give layout= (or student_layout= / teacher_layout=) only")
            both = self.options["layout"]
        try:
            for value in (both, self.student_layout, self.teacher_layout):
                parse_layout(value)
        except ValueError as error:
            raise ValueError(f"term {self.key!r}: {error}") from None
        self.layouts = {"student": self.student_layout if self.student_layout is not None else both,
                        "teacher": self.teacher_layout if self.teacher_layout is not None else both}

    @property
    def has_globs(self) -> bool:
        return any(any(c in name for c in "*?[") for name in self.teacher_layers + self.student_layers)

    def expand_globs(self, teacher: nn.Module, student: nn.Module) -> None:
        """Replace glob layer specs (``"group*"``) by the layers they match, in the model's module order, and
        check that both sides then name as many layers (what the Distiller does before anything else)."""
        if not self.has_globs:
            return
        from featkd.layer_specs import LayerKeyError, resolve_layers, unwrap

        def expand(role, model, specs):
            try:
                return resolve_layers(model, specs)
            except LayerKeyError as error:  # which network lacks the layer, as the Distiller's capture says
                raise LayerKeyError(f"{role} {type(unwrap(model)).__name__}: {error}") from None

        key = self.key
        teacher_layers = expand("teacher", teacher, self.teacher_layers)
        student_layers = expand("student", student, self.student_layers)
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f"term {key!r}: the teacher's {self.teacher_layers} match {len(teacher_layers)} layers "
                             f"{teacher_layers}, the student's {self.student_layers} match {len(student_layers)} "
                             f"{student_layers}; give patterns (or lists) that match as many layers on both sides")
        self.teacher_layers, self.student_layers = teacher_layers, student_layers

    @property
    def loss_options(self) -> dict[str, Any]:
        """The options the loss is built with (a layout is the term's business, not the loss's)."""
        return {k: v for k, v in self.options.items() if k != "layout"}

    @property
    def multi_layer(self) -> bool:
        """Whether the loss takes the lists of layers at once (e.g. FSP) rather than one pair at a time:
        the ``multi_layer`` capability its registration (or a module of your own) declares."""
        loss = feature_loss_class(self.loss) if isinstance(self.loss, str) else self.loss
        return bool(getattr(loss, "multi_layer", False))

    @property
    def as_captured(self) -> bool:
        """Whether the loss reads its features as captured, without a layout or an adapter (``as_captured``)."""
        loss = feature_loss_class(self.loss) if isinstance(self.loss, str) else self.loss
        return bool(getattr(loss, "as_captured", False))

    @property
    def loss_name(self) -> str:
        return self.loss if isinstance(self.loss, str) else type(self.loss).__name__

    @property
    def key(self) -> str:
        return self.name or f"{self.loss_name}:{'+'.join(self.student_layers)}"


class FeatureAdapter(nn.Module):
    """Map a student feature to the teacher's shape; both are channels-first views (:mod:`featkd.layouts`).

    Channels: present when ``channels=True`` or the counts differ. Onto a map, a 1×1 convolution followed
    by batch norm (FitNets'/RepDistiller's connector); onto a ``(B, C, N)`` sequence, a linear projection of
    each position alone (TinyBERT's ``W_h``): batch norm there would pool every sample's tokens, padding
    included, into its statistics, and a padded batch would no longer give its samples' values. Size, for maps ``(B, C, H, W)`` on both sides: adaptive
    average pooling when the student map is larger, bilinear interpolation when it is smaller (tokens on
    their grid are maps here, so a ViT's 14×14 tokens meet a ResNet's 56×56 map this way, in either
    direction). A ``(B, Ct, N)`` teacher (tokens kept with their prefix, a class token) takes the student
    flattened when it has N positions, or averaged to one position when N is 1.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], channels: bool | None = None):
        super().__init__()
        student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
        self.size = teacher_shape[2:]
        positions = (math.prod(student_shape[2:]), math.prod(self.size))
        if len(teacher_shape) == 4 and len(student_shape) == 4:
            self.resize = None
            if student_shape[2:] != self.size:
                larger = student_shape[2] >= self.size[0] and student_shape[3] >= self.size[1]
                self.resize = "pool" if larger else "interpolate"
        elif len(teacher_shape) == 3 and len(student_shape) in (3, 4) and positions[1] in (1, positions[0]):
            self.resize = "flatten" if positions[0] == positions[1] else "mean"
        else:
            raise ValueError(f"an automatic adapter maps a student (B, C, H, W) map to a teacher map, or to a "
                             f"teacher (B, C, N) sequence of as many positions or of one; got student "
                             f"{student_shape} and teacher {teacher_shape}")
        c_s, c_t = student_shape[1], teacher_shape[1]
        use_conv = c_s != c_t if channels is None else channels
        self.conv = None
        if use_conv and len(teacher_shape) == 4:
            self.conv = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
        elif use_conv:
            self.conv = nn.Conv1d(c_s, c_t, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.resize == "pool":
            f = F.adaptive_avg_pool2d(f, self.size)
        elif self.resize == "interpolate":
            f = F.interpolate(f, size=self.size, mode="bilinear", align_corners=False)
        elif self.resize == "flatten":
            f = f.flatten(2)
        elif self.resize == "mean":
            f = f.flatten(2).mean(2, keepdim=True)
        return self.conv(f) if self.conv is not None else f

    def extra_repr(self) -> str:
        return f"resize={self.resize}, size={self.size}"


def view(f: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """A captured feature as its term's adapter and loss see it: channels first (``layout`` None: as it is)."""
    return f if layout is None else to_channels_first(f, layout)


# --------------------------------------------------------------------------- building a term's modules


class TermModules(NamedTuple):
    """What :func:`build_term_pairs` builds for a term: per (student, teacher) layer pair (one entry for a
    ``multi_layer`` loss) its ``adapters`` and ``losses``, and per layer of each side the resolved layout
    that :func:`view` applies before them."""

    adapters: nn.ModuleList
    losses: nn.ModuleList
    student_layouts: list[Layout | None]
    teacher_layouts: list[Layout | None]


def _captured(value) -> CapturedFeature:
    """A dry run's :class:`~featkd.layouts.CapturedFeature`; a bare shape keeps the older contract of
    channels-first features ((B, C, H, W) or (B, C, N))."""
    if isinstance(value, CapturedFeature):
        return value
    shape = tuple(value)
    return CapturedFeature(shape, Layout("NCHW" if len(shape) == 4 else "NCL") if len(shape) in (3, 4) else None)


def build_term_pairs(term: Term, student_features: Mapping[str, Any], teacher_features: Mapping[str, Any],
                     device: torch.device) -> TermModules:
    """The layouts, adapters and loss modules of ``term``, one per (student, teacher) layer pair, or one for
    all its layers when its loss is ``multi_layer``. ``*_features`` are the dry run's
    :class:`~featkd.layouts.CapturedFeature` by layer (:func:`featkd.layer_info.describe_features`); bare
    shapes are read as channels-first."""
    layouts, shapes = {}, {}
    for side, names, features in (("student", term.student_layers, student_features),
                                  ("teacher", term.teacher_layers, teacher_features)):
        captured = [_captured(features[name]) for name in names]
        if term.as_captured:
            layouts[side] = [None] * len(captured)
        else:
            layouts[side] = [resolve_layout(term.layouts[side], feature, f"term {term.key!r}: {side} layer "
                                            f"{name!r}", f"{side}_layout") for feature, name in zip(captured, names)]
        shapes[side] = [feature.shape if layout is None else canonical_shape(feature.shape, layout)
                        for feature, layout in zip(captured, layouts[side])]
    s_shapes, t_shapes = shapes["student"], shapes["teacher"]
    if term.multi_layer:
        pairs = [_build_pair(term, tuple(s_shapes), tuple(t_shapes), term.student_layers, term.teacher_layers,
                             device, multi=True)]
    else:
        pairs = [_build_pair(term, s, t, [s_name], [t_name], device)
                 for s, t, s_name, t_name in zip(s_shapes, t_shapes, term.student_layers, term.teacher_layers)]
    return TermModules(nn.ModuleList(adapter for adapter, _ in pairs),
                       nn.ModuleList(loss.to(device) for _, loss in pairs), layouts["student"], layouts["teacher"])


def _build_pair(term: Term, s_shape: tuple, t_shape: tuple, s_names: list[str], t_names: list[str],
                device: torch.device, multi: bool = False) -> tuple[nn.Module, nn.Module]:
    """The adapter and loss module for one (student, teacher) layer pair (or the lists, for a multi_layer loss);
    the shapes are those of the channels-first views."""
    described = (f"term {term.key!r} ({term.loss_name}): student layer(s) {s_names} give {s_shape}, "
                 f"teacher layer(s) {t_names} give {t_shape} (channels first)")
    if term.adapter is None or term.adapter == "auto":
        adapter = nn.Identity()
    elif multi:
        raise ValueError(f"{described}: adapter={term.adapter!r} does not apply to a loss over several layers")
    elif term.adapter == "conv":
        try:
            adapter = FeatureAdapter(s_shape, t_shape, channels=True)
        except ValueError as error:
            raise ValueError(f"{described}: {error}") from None
    else:
        adapter = term.adapter
    adapter.to(device)
    if not isinstance(adapter, nn.Identity):
        with torch.no_grad():
            s_shape = tuple(adapter(torch.zeros(s_shape, device=device)).shape)
    try:
        return adapter, _loss(term, s_shape, t_shape)
    except ValueError as error:
        first_error = error
    if term.adapter in ("auto", None) and not multi and not term.as_captured:
        try:
            candidates = _automatic_adapters(s_shape, t_shape)
        except ValueError:  # no automatic adapter fits these shapes
            raise ValueError(f"{described}: {first_error}") from None
        for adapter in candidates:
            adapted = (s_shape[0], t_shape[1] if adapter.conv is not None else s_shape[1], *t_shape[2:])
            try:
                loss = _loss(term, adapted, t_shape)
            except ValueError as error:
                last_error = error
                continue
            if term.adapter == "auto":
                return adapter.to(device), loss
            raise ValueError(f"{described}: {first_error}; adapter: null asks for none, and adapter: auto (the "
                             f"default) would fit the student's features to {adapted}") from None
        if term.adapter == "auto" and str(last_error) != str(first_error):
            raise ValueError(f"{described}: {first_error}; with an automatic adapter to {adapted}: "
                             f"{last_error}") from None
    raise ValueError(f"{described}: {first_error}") from None


def _automatic_adapters(s_shape, t_shape) -> list[FeatureAdapter]:
    """The automatic adapters for these shapes, the one with the least in it first."""
    full = FeatureAdapter(s_shape, t_shape)
    if full.conv is not None and full.resize is not None:
        # A loss that compares unequal channel counts (AT, NST, Gram) needs only the size matched, and
        # then no learned projection stands between the student's features and the loss.
        return [FeatureAdapter(s_shape, t_shape, channels=False), full]
    return [full]


def with_mask(context: BatchContext, mask: torch.Tensor | None, layout) -> BatchContext:
    """``context`` with the batch's token mask as the positions of a feature's channels-first view: mapped
    through a token layout (prefix tokens dropped or kept as the layout says), as it is otherwise (attention
    probabilities take the (B, L) mask itself)."""
    if mask is None:
        return context
    if layout is not None and layout.kind in ("NLC", "NCL"):
        mask = mask_to_channels_first(mask, layout)
    return replace(context, attention_mask=mask)


def call_loss(loss: nn.Module, f_s, f_t, context) -> torch.Tensor:
    """``loss(f_s, f_t)``, with the batch's :class:`featkd.losses.BatchContext` for a loss that ``uses_context``."""
    return loss(f_s, f_t, context) if getattr(loss, "uses_context", False) else loss(f_s, f_t)


def _loss(term: Term, s_shape, t_shape) -> nn.Module:
    if isinstance(term.loss, nn.Module):
        check = getattr(term.loss, "check_shapes", None)
        if check is not None:
            check(s_shape, t_shape)
        return term.loss
    return build_feature_loss(term.loss, s_shape, t_shape, **term.loss_options)
