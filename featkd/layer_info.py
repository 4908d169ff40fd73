"""``list_layers``: every hookable module of a model with what it produced for an example input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from featkd.hooks import probe
from featkd.layer_specs import named_modules

__all__ = ["LayerInfo", "list_layers"]


class LayerInfo(NamedTuple):
    """One hookable module and what it produced for the example input.

    ``shape`` is the output shape (a tuple of shapes, ``None`` for non-tensors, when the
    output is a tuple/list); ``layout`` is ``"NCHW"``, ``"NCL"`` (1-d conv/norm/pool),
    ``"NLC"`` (tokens, channels last, e.g. transformer blocks), ``"NC"`` or ``""``;
    ``stride`` is input size / output spatial size (for tokens: the patch grid's, with
    ``prefix_tokens`` class/distillation tokens in front), ``None`` when not spatial.
    """

    name: str
    type: str
    shape: Any
    channels: int | None
    stride: int | float | tuple | None
    layout: str = ""
    calls: int = 1
    prefix_tokens: int = 0


_CHANNELS_FIRST_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d,
                      nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


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


def _layer_info(name: str, module: nn.Module, output: Any, calls: int, in_hw: tuple[int, ...] | None) -> LayerInfo:
    type_name = type(module).__name__
    if not isinstance(output, torch.Tensor):
        return LayerInfo(name, type_name, _shape_of(output), None, None, "", calls)
    shape = tuple(output.shape)
    if output.dim() == 4:
        stride = None
        if in_hw is not None and len(in_hw) == 2:
            sh, sw = _ratio(in_hw[0], shape[2]), _ratio(in_hw[1], shape[3])
            stride = sh if sh == sw else (sh, sw)
        return LayerInfo(name, type_name, shape, shape[1], stride, "NCHW", calls)
    if output.dim() == 3 and isinstance(module, _CHANNELS_FIRST_1D):
        stride = _ratio(in_hw[0], shape[2]) if in_hw is not None and len(in_hw) == 1 else None
        return LayerInfo(name, type_name, shape, shape[1], stride, "NCL", calls)
    if output.dim() == 3:
        stride, prefix = None, 0
        if in_hw is not None and len(in_hw) == 2:
            stride, prefix = _token_grid(shape[1], in_hw)
        return LayerInfo(name, type_name, shape, shape[2], stride, "NLC", calls, prefix)
    if output.dim() == 2:
        return LayerInfo(name, type_name, shape, shape[1], None, "NC", calls)
    return LayerInfo(name, type_name, shape, None, None, "", calls)


def _token_grid(tokens: int, in_hw: tuple[int, int]) -> tuple[int | None, int]:
    """Patch size and number of prefix (class / distillation / register) tokens of a token sequence."""
    h, w = in_hw
    for prefix in range(0, min(tokens, 9)):
        grid = tokens - prefix
        for patch in range(1, min(h, w) + 1):
            if h % patch == 0 and w % patch == 0 and (h // patch) * (w // patch) == grid:
                return patch, prefix
    return None, 0


def list_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Every hookable module (canonical dotted name, root excluded) with its output for ``example_input``.

    Runs one forward in eval mode under ``torch.no_grad()`` (training flags are restored;
    nothing is updated). ``example_input`` is a tensor, or a tuple of positional arguments.
    Modules that did not run are left out; ``calls`` counts modules that ran several times.
    """
    modules = named_modules(model)
    features = probe(model, example_input, [name for name in modules if name])
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    in_hw = tuple(args[0].shape[2:]) if isinstance(args[0], torch.Tensor) and args[0].dim() >= 3 else None
    return [_layer_info(name, modules[name], calls[0], len(calls), in_hw)
            for name in features if (calls := features.calls(name))]
