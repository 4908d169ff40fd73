"""Loss modules by name, registered next to their definitions with what the Distiller needs to know.

    @register_feature_loss("fsp", multi_layer=True)
    class FSPLoss(nn.Module): ...

A feature loss's capabilities are class attributes of its module, set by the registration (a module
of your own given to :class:`featkd.Term` may set them itself):

* ``multi_layer``: ``forward(f_s, f_t)`` takes the lists of the term's student and teacher features at
  once (FSP) instead of one (student, teacher) pair at a time; its build shapes are tuples of shapes.
* ``needs_shapes``: the constructor takes ``(student_shape, teacher_shape, **options)`` and builds
  parameters for them (FitNets' regressor). Otherwise the module is built from its options and, when it
  has ``check_shapes(student_shape, teacher_shape)``, checked against the shapes.
* ``uses_context``: ``forward(f_s, f_t, context)`` also receives the batch's :class:`BatchContext`
  (targets, step, epoch, the samples' dataset indices when the loader yields them, the token mask
  when the batch has one), e.g. for a loss that keeps a memory bank indexed by sample (CRD) or a token
  loss that leaves padding out (NST, AT, Gram, hint, cosine, attention_kl).
* ``as_captured``: the loss reads the captured tensors as they are, with no layout and no adapter
  (attention probabilities (B, heads, L, L): neither a map nor tokens); the token mask reaches it as
  the batch gives it.

Shapes are full tensor shapes from a dry-run forward, batch dimension included.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor, nn

from featkd.functional.shapes import positions_match, unknown_name_error

Shape = Sequence[int]

_FEATURE_LOSSES: dict[str, type[nn.Module]] = {}
_LOGIT_LOSSES: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class BatchContext:
    """What a feature loss registered with ``uses_context=True`` receives with each batch."""

    targets: Tensor | None = None
    step: int | None = None
    epoch: float | None = None
    indices: Tensor | None = None  # the batch's dataset indices, when the training loader yields them
    # (B, N) token mask, True or 1 at valid positions (a Hugging Face attention_mask), over the positions
    # of the channels-first view the loss receives: the whole sequence, prefix tokens included, for a
    # plain (B, C, N) sequence; featkd.layouts.mask_to_channels_first maps a mask over a model's tokens
    # onto the view of a layout that drops or selects tokens.
    attention_mask: Tensor | None = None


def check_positions(loss: str, student_shape: Shape, teacher_shape: Shape) -> None:
    """Refuse channels-first features at different positions, in one line that says who resizes: a loss module
    compares features as they are, and the :class:`featkd.Term`'s adapter brings the student to the teacher's
    grid."""
    if not positions_match(student_shape, teacher_shape):
        raise ValueError(f"{loss} compares features at the same positions: student {tuple(student_shape)} vs teacher "
                         f"{tuple(teacher_shape)} (channels first); a Term with adapter: auto (the default) resizes "
                         "the student's map to the teacher's grid")


def context_mask(context: BatchContext | None) -> Tensor | None:
    """The token mask a token loss module uses: the context's ``attention_mask``, None without a context."""
    return None if context is None else context.attention_mask


def _register(registry: dict, kind: str, name: str, cls: type) -> None:
    if registry.get(name, cls) is not cls:
        raise ValueError(f"{kind} {name!r} is registered already, by {registry[name].__qualname__}")
    registry[name] = cls


def register_feature_loss(name: str, *, multi_layer: bool = False, needs_shapes: bool = False,
                          uses_context: bool = False, as_captured: bool = False) -> Callable[[type], type]:
    """Class decorator: build the module under ``name`` in :func:`build_feature_loss` and ``Term(loss=name)``."""

    def register(cls: type) -> type:
        _register(_FEATURE_LOSSES, "feature loss", name, cls)
        cls.multi_layer, cls.needs_shapes, cls.uses_context = multi_layer, needs_shapes, uses_context
        cls.as_captured = as_captured
        return cls

    return register


def register_logit_loss(name: str) -> Callable[[type], type]:
    """Class decorator: build the module under ``name`` in :func:`build_logit_loss` and ``kd={"loss": name}``.

    The module's ``forward(student_logits, teacher_logits, targets=None)`` returns a scalar.
    """

    def register(cls: type) -> type:
        _register(_LOGIT_LOSSES, "logit loss", name, cls)
        return cls

    return register


def feature_loss_names() -> list[str]:
    return sorted(_FEATURE_LOSSES)


def logit_loss_names() -> list[str]:
    return sorted(_LOGIT_LOSSES)


def feature_loss_class(name: str) -> type[nn.Module]:
    """The module registered as ``name``; a ValueError suggesting close names for an unknown one."""
    if name not in _FEATURE_LOSSES:
        raise unknown_name_error("feature loss", name, feature_loss_names())
    return _FEATURE_LOSSES[name]


def _check_options(kind: str, name: str, cls: type, options: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # e.g. NST passes extra options to its kernel, which checks them
    known = [p for p in params if p not in ("self", "student_shape", "teacher_shape")]
    for key in options:
        if key not in known:
            raise unknown_name_error(f"{kind} {name!r} option", key, known)


def build_feature_loss(name: str, student_shape: Shape, teacher_shape: Shape, **options) -> nn.Module:
    """A feature-loss module by name (:func:`feature_loss_names`), checked against the feature shapes.

    Shapes are full tensor shapes from a dry run (batch included), or tuples of them for a
    ``multi_layer`` loss. Raises ValueError for an unknown name or option, or shapes the loss cannot compare.
    """
    cls = feature_loss_class(name)
    _check_options("feature loss", name, cls, options)
    if cls.needs_shapes:
        return cls(student_shape, teacher_shape, **options)
    module = cls(**options)
    check = getattr(module, "check_shapes", None)
    if check is not None:
        check(student_shape, teacher_shape)
    return module


def build_logit_loss(name: str, **options) -> nn.Module:
    """A logit-loss module by name (:func:`logit_loss_names`)."""
    if name not in _LOGIT_LOSSES:
        raise unknown_name_error("logit loss", name, logit_loss_names())
    cls = _LOGIT_LOSSES[name]
    _check_options("logit loss", name, cls, options)
    return cls(**options)
