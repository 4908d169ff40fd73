"""What a model's layers produce for an example input: ``list_layers`` (every module) and ``describe_features``
(the layers a term names, with the layout the model states, for :func:`featkd.layouts.resolve_layout`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from featkd.hooks import probe
from featkd.layer_specs import Spec, named_modules, resolve_specs
from featkd.layouts import CapturedFeature, Layout, canonical_shape, resolve_layout
from featkd.models.stated_layouts import known_layout

__all__ = ["LayerInfo", "describe_features", "list_layers"]


class LayerInfo(NamedTuple):
    """One hookable module and what it produced for the example input.

    ``shape`` is the output shape (a tuple of shapes, ``None`` for non-tensors, when the
    output is a tuple/list); ``layout`` is ``"NCHW"``, ``"NHWC"`` (channels-last maps),
    ``"NCL"`` (1-d conv/norm/pool), ``"NLC"`` (tokens, e.g. transformer blocks), ``"NC"``,
    ``"?"`` (a 3-d or 4-d output whose layout neither the model nor its shape settles) or ``""``,
    as the model states it or else as the only reading of the shape (:mod:`featkd.layouts`);
    ``channels`` and ``stride`` (input size / the map's or token grid's size, ``None`` when not
    spatial) follow from it, with ``prefix_tokens`` class/distillation/register tokens in front
    of the ``grid`` of tokens; ``order`` is when the module's first call finished in the forward.
    """

    name: str
    type: str
    shape: Any
    channels: int | None
    stride: int | float | tuple | None
    layout: str = ""
    calls: int = 1
    prefix_tokens: int = 0
    grid: tuple[int, ...] | None = None
    order: int = 0


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _shape_of(v) for k, v in value.items()}
    return None


def _ratio(a: int, b: int) -> int | float:
    r = a / b
    return int(r) if r == int(r) else round(r, 3)


def _input_size(example_input: Any) -> tuple[int, ...] | None:
    """The spatial size of an image (or sequence) batch: the first positional argument's, or the first keyword
    argument's with a spatial size (``pixel_values``, not ``input_ids``); ``None`` for any other input."""
    if isinstance(example_input, Mapping):
        args = tuple(v for v in example_input.values() if isinstance(v, torch.Tensor) and v.dim() >= 3)
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
    first = args[0] if args else None
    return tuple(first.shape[2:]) if isinstance(first, torch.Tensor) and first.dim() >= 3 else None


def describe_features(model: nn.Module, layers: str | Sequence[str], example_input: Any) -> dict[str, CapturedFeature]:
    """Each captured layer's shape in a :func:`featkd.hooks.probe` of ``example_input`` (featkd's one dry run),
    with the layout the model states for it (:func:`featkd.models.stated_layouts.known_layout`) and the input's
    spatial size: what :func:`featkd.layouts.resolve_layout` needs. Raises as reading a
    :class:`featkd.hooks.Features` does when a layer did not run, or ran several times without a ``#k``
    call selected."""
    specs = resolve_specs(model, layers)
    features = probe(model, example_input, [s.key for s in specs])
    modules = named_modules(model)
    in_size = _input_size(example_input)
    described = {}
    for spec in specs:
        shape = tuple(features[spec.key].shape)
        described[spec.key] = CapturedFeature(shape, known_layout(model, modules, spec, shape, in_size), in_size)
    return described


def _layer_info(spec: Spec, module: nn.Module, output: Any, calls: int, order: int, feature: CapturedFeature
                ) -> LayerInfo:
    type_name = type(module).__name__
    if not isinstance(output, torch.Tensor):
        return LayerInfo(spec.key, type_name, _shape_of(output), None, None, "", calls, order=order)
    shape = tuple(output.shape)
    if output.dim() == 2:
        return LayerInfo(spec.key, type_name, shape, shape[1], None, "NC", calls, order=order)
    try:
        layout = resolve_layout(None, feature, spec.key)
    except ValueError:  # the table shows what is unknown; a term using the layer is where it must be settled
        layout = None
    if layout is None:
        return LayerInfo(spec.key, type_name, shape, None, None, "?" if output.dim() in (3, 4) else "", calls,
                         order=order)
    canon = canonical_shape(shape, layout)
    grid, in_size = canon[2:], feature.input_size
    stride = None
    if in_size is not None and len(in_size) == len(grid):
        strides = tuple(_ratio(size, cells) for size, cells in zip(in_size, grid))
        stride = strides[0] if len(set(strides)) == 1 else strides
    return LayerInfo(spec.key, type_name, shape, canon[1], stride, layout.kind, calls, layout.prefix_tokens or 0,
                     grid, order)


def list_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Every hookable module (canonical dotted name, root excluded) with its output for ``example_input``.

    Runs one forward in eval mode under ``torch.no_grad()`` (training flags are restored;
    nothing is updated). ``example_input`` is a tensor, or a tuple of positional arguments.
    Modules that did not run are left out; ``calls`` counts modules that ran several times.
    """
    modules = named_modules(model)
    names = [name for name in modules if name]
    features = probe(model, example_input, names)
    first_finished = {}
    for position, key in enumerate(features.order):
        first_finished.setdefault(key, position)
    specs = {s.key: s for s in resolve_specs(model, names)}
    in_size = _input_size(example_input)
    infos = []
    for name in features:
        calls = features.calls(name)
        if not calls:
            continue
        output = calls[0]
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
        known: Layout | None = known_layout(model, modules, specs[name], shape, in_size) if shape else None
        infos.append(_layer_info(specs[name], modules[name], output, len(calls), first_finished[name],
                                 CapturedFeature(shape, known, in_size)))
    return infos
