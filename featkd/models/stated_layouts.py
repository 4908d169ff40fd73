"""What a model states about the layout of its features (the vocabulary is :mod:`featkd.layouts`).

:func:`known_layout` reads a captured feature's layout from the model, first match wins:

1. **The module that produced it.** A ``feature_layout`` attribute (``"NHWC"``, a mapping, a
   :class:`~featkd.layouts.Layout`) set on any module of your own; timm's ``output_fmt`` (its patch
   embeddings: tokens when they flatten); torchvision's ``Permute`` by its dims; ``*2d`` modules
   (``Conv2d``, ``BatchNorm2d``, ``LayerNorm2d``, pools) give ``(B, C, H, W)`` and ``*1d`` modules
   ``(B, C, L)``, as PyTorch's naming promises; ``nn.LayerNorm`` and ``nn.Linear`` act on the last
   dimension, so it holds the channels; ``nn.Sequential`` returns its last child's output, and an
   activation, dropout or identity inside one keeps its input's layout.
2. **The model's description of itself.** torchvision's ``SwinTransformer`` (its stages are
   channels-last), ``ConvNeXt`` (channels-first between its blocks' permutes) and ``VisionTransformer``
   (tokens behind one class token on the ``image_size / patch_size`` grid) and its detectors (maps);
   Hugging Face transformers' hidden states (a text model's a plain token sequence, ViT's behind its
   class token); timm's token models
   (``num_prefix_tokens`` and ``patch_embed``), its ``output_fmt`` and ``feature_info`` channel counts, and
   featkd's own ``feature_info``.

Nothing here reads a layout off a shape; :func:`featkd.layouts.resolve_layout` does that, and only when
exactly one reading fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import nn

from featkd.layer_specs import Spec
from featkd.layouts import Layout, parse_layout

__all__ = ["known_layout"]

_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.AlphaDropout)
_PASS_THROUGH_NAMES = ("StochasticDepth", "DropPath")


def known_layout(model: nn.Module, modules: Mapping[str, nn.Module], spec: Spec, shape: tuple[int, ...],
                 input_size: tuple[int, ...] | None) -> Layout | None:
    """The layout ``model`` states for the feature ``spec`` captured with ``shape`` (``None``: it does not say).

    ``modules``: the model's canonical ``name -> module`` (:func:`featkd.layer_specs.named_modules`);
    ``input_size``: the example input's spatial size.
    """
    rank = len(shape)
    if rank not in (3, 4):
        return None
    kind = None
    if not spec.selectors:  # a module's output (or input) as it is, not a part of a tuple
        kind = _input_kind(modules, spec.path, rank) if spec.port == "input" else _output_kind(modules, spec.path, rank)
    described = next((found for rule in _MODEL_RULES
                      if (found := rule(model, spec.path, shape, input_size)) is not None), None)
    if kind is None:
        return described
    layout = kind if isinstance(kind, Layout) else Layout(kind, source="model")
    if described is not None and described.kind == layout.kind and layout.grid is None:
        return described  # e.g. a LayerNorm's tokens, with the prefix count and grid the model gives
    return layout


# --------------------------------------------------------------------------- 1. the producing module


def _output_kind(modules: Mapping[str, nn.Module], path: str, rank: int) -> str | Layout | None:
    module = modules[path]
    declared = getattr(module, "feature_layout", None)
    if declared is not None:
        layout = parse_layout(declared, rank)
        return Layout(layout.kind, layout.prefix_tokens, layout.grid, layout.tokens, source="model")
    kind = _kind_by_type(module, rank, root=path == "")
    if kind == "same":
        return _input_kind(modules, path, rank)
    if kind is None and isinstance(module, nn.Sequential) and len(module):
        last = list(module.named_children())[-1][0]
        return _output_kind(modules, f"{path}.{last}" if path else last, rank)
    return kind


def _input_kind(modules: Mapping[str, nn.Module], path: str, rank: int) -> str | Layout | None:
    """The layout of what ``path`` received, where its parent is an ``nn.Sequential`` (which feeds each
    child its previous sibling's output, and its first child its own input)."""
    if path == "":
        return "NCHW" if rank == 4 else None  # the model's input: an image batch
    parent, _, name = path.rpartition(".")
    container = modules[parent]
    if not isinstance(container, nn.Sequential):
        return None
    names = [n for n, _ in container.named_children()]
    index = names.index(name)
    if index == 0:
        return _input_kind(modules, parent, rank)
    return _output_kind(modules, f"{parent}.{names[index - 1]}" if parent else names[index - 1], rank)


def _kind_by_type(module: nn.Module, rank: int, root: bool) -> str | None:
    """What a module's type says about its output's layout; ``"same"``: the layout of its input."""
    name = type(module).__name__
    fmt = getattr(module, "output_fmt", None)
    if fmt is not None and not root:  # timm: PatchEmbed (tokens when it flattens), NHWC embeddings
        fmt = "NLC" if getattr(module, "flatten", False) is True else str(getattr(fmt, "value", fmt))
        return fmt if fmt in ("NCHW", "NHWC", "NLC", "NCL") and len(fmt) == rank else None
    if name == "Permute" and isinstance(getattr(module, "dims", None), (list, tuple)) and rank == 4:
        return {(0, 2, 3, 1): "NHWC", (0, 3, 1, 2): "NCHW"}.get(tuple(module.dims))
    if name.endswith("2d"):
        return "NCHW" if rank == 4 else None
    if name.endswith("1d"):
        return "NCL" if rank == 3 else None
    if isinstance(module, nn.GroupNorm):
        return "NCHW" if rank == 4 else "NCL"
    if isinstance(module, nn.Linear) or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1):
        return "NHWC" if rank == 4 else "NLC"
    if isinstance(module, _PASS_THROUGH) or name in _PASS_THROUGH_NAMES or (
            type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention)):
        return "same"
    return None


# --------------------------------------------------------------------------- 2. the model's description

Rule = Callable[..., "Layout | None"]  # (model, module path, feature shape, input size) -> its layout, or None
_MODEL_RULES: list[Rule] = []


def _model_rule(rule: Rule) -> Rule:
    _MODEL_RULES.append(rule)
    return rule


def _is_torchvision(model: nn.Module, class_name: str) -> bool:
    return type(model).__name__ == class_name and type(model).__module__.startswith("torchvision.")


def _tokens(tokens: int, grid: tuple[int, int] | None, prefix_counts: tuple[int, ...]) -> Layout | None:
    """Tokens on ``grid`` behind one of ``prefix_counts`` prefix tokens (the first that fits ``tokens``)."""
    if grid is None:
        return None
    for prefix in prefix_counts:
        if tokens - prefix == grid[0] * grid[1]:
            return Layout("NLC", prefix, grid, source="model")
    return None


@_model_rule
def _torchvision_vit(model, path, shape, input_size) -> Layout | None:
    """torchvision's ViT: the encoder's tokens carry one class token; the grid is image_size / patch_size."""
    if not _is_torchvision(model, "VisionTransformer") or len(shape) != 3 or not path.startswith("encoder"):
        return None
    grid = None if input_size is None or len(input_size) != 2 else (
        input_size[0] // model.patch_size, input_size[1] // model.patch_size)
    return _tokens(shape[1], grid, (1, 0))


@_model_rule
def _torchvision_swin(model, path, shape, input_size) -> Layout | None:
    """torchvision's Swin works on (B, H, W, C) from its patch embedding to its final norm."""
    if _is_torchvision(model, "SwinTransformer") and len(shape) == 4 and path.split(".")[0] in ("features", "norm"):
        return Layout("NHWC", source="model")
    return None


@_model_rule
def _torchvision_convnext(model, path, shape, input_size) -> Layout | None:
    """torchvision's ConvNeXt is channels-first outside its blocks' permuted MLPs (which the module rules read)."""
    if _is_torchvision(model, "ConvNeXt") and len(shape) == 4:
        return Layout("NCHW", source="model")
    return None


@_model_rule
def _torchvision_detection(model, path, shape, input_size) -> Layout | None:
    """torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD...) are convolutional throughout: their
    backbone and FPN maps are (B, C, H, W), on images the detector resized itself."""
    if type(model).__module__.startswith("torchvision.models.detection.") and len(shape) == 4:
        return Layout("NCHW", source="model")
    return None


@_model_rule
def _timm_tokens(model, path, shape, input_size) -> Layout | None:
    """timm's token models (ViT, DeiT, EVA, BEiT...): ``num_prefix_tokens`` class/distillation/register tokens
    in front of the patch embedding's grid (before the prefix tokens are added, none)."""
    embed = getattr(model, "patch_embed", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if len(shape) != 3 or not isinstance(prefix, int) or embed is None:
        return None
    grid = getattr(embed, "grid_size", None)
    if input_size is not None and len(input_size) == 2 and hasattr(embed, "dynamic_feat_size"):
        grid = embed.dynamic_feat_size(tuple(input_size))
    return _tokens(shape[1], tuple(grid) if grid is not None else None, (prefix, 0))


@_model_rule
def _hugging_face_tokens(model, path, shape, input_size) -> Layout | None:
    """A Hugging Face transformer's (B, L, hidden_size) hidden states are tokens. A text model's are a plain
    sequence: every position a token (its [CLS] or first token counted like the others, as the attention mask
    counts it); a vision model's (``patch_size`` in its config) carry its class token before the
    ``image_size / patch_size`` grid."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    # a transformer's hidden states are (B, L, hidden) whatever L is, also where L equals the width
    if (not type(model).__module__.startswith("transformers.") or len(shape) != 3 or not isinstance(hidden, int)
            or shape[-1] != hidden):
        return None
    patch = getattr(config, "patch_size", None)
    if patch is None:
        return Layout("NLC", 0, tokens="all", source="model")
    grid = None if input_size is None or len(input_size) != 2 else (input_size[0] // patch, input_size[1] // patch)
    return _tokens(shape[1], grid, (1, 0))


@_model_rule
def _declared_output_format(model, path, shape, input_size) -> Layout | None:
    """A model's ``output_fmt`` (timm's Swin: ``NHWC``) is the layout of its 4-d features."""
    fmt = getattr(model, "output_fmt", None)
    fmt = str(getattr(fmt, "value", fmt)) if fmt is not None else None
    return Layout(fmt, source="model") if fmt in ("NCHW", "NHWC") and len(shape) == 4 else None


@_model_rule
def _feature_info_channels(model, path, shape, input_size) -> Layout | None:
    """A layer that ``feature_info`` lists with its channel count: the dimension that holds that count."""
    channels = _feature_channels(model).get(path)
    if channels is None:
        return None
    first, last = shape[1] == channels, shape[-1] == channels
    if first == last:
        return None
    if len(shape) == 4:
        return Layout("NCHW" if first else "NHWC", source="model")
    return None if first else Layout("NLC", source="model")  # tokens: prefix and grid come from the shape


def _feature_channels(model: nn.Module) -> dict[str, int]:
    info: Any = getattr(model, "feature_info", None)
    if info is not None and hasattr(info, "get_dicts"):  # timm's FeatureInfo
        info = info.get_dicts()
    if not isinstance(info, (list, tuple)):
        return {}
    found = {}
    for entry in info:
        if isinstance(entry, dict) and "module" in entry and "num_chs" in entry:
            found[entry["module"]] = entry["num_chs"]
        elif hasattr(entry, "name") and hasattr(entry, "channels"):  # featkd's FeatureInfo
            found[entry.name] = entry.channels
    return found
