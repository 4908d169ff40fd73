"""``create_model`` by name, ``list_models``, and feature metadata for any model.

Names:
* featkd's own: ``wrn{depth}_{width}`` (also ``wrn-16-1``, ``WRN-40-2``), ``resnet{depth}`` (CIFAR, 6n+2),
  ``nin``, ``nin_thin``, ``mlp`` (on flattened images: ``image_size``, ``hidden``, ``dropout``);
* ``torchvision:<name>`` — a torchvision classification model with ``weights=None``;
* ``timm:<name>`` — ``timm.create_model(name, pretrained=False, ...)``;
* ``hf:<architecture>`` — a Hugging Face ``transformers`` model built from its config (:mod:`featkd.models.hf`);
* ``package.module:factory`` — any importable callable returning an ``nn.Module``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from featkd.hooks import probe
from featkd.layer_specs import unwrap
import featkd.models.mlp  # noqa: F401  (each model module registers its names in the catalog)
import featkd.models.nin  # noqa: F401
import featkd.models.resnet_cifar  # noqa: F401
import featkd.models.wrn  # noqa: F401
from featkd.models import catalog
from featkd.models.features import FeatureInfo



def list_models() -> list[str]:
    """featkd's built-in model names (``wrn{d}_{k}`` and ``resnet{d}`` accept any valid depth/width)."""
    return catalog.model_names()


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a model by name with ``num_classes`` outputs for ``in_channels``-channel images.

    Extra ``kwargs`` go to the constructor (e.g. ``dropout=0.3`` for WRN, ``shortcut="B"`` for ResNets).
    Raises ``ValueError`` listing close matches for an unknown name, and naming an option the constructor
    does not take with the options it does.
    """
    try:
        return _create_model(name, num_classes, in_channels, **kwargs)
    except TypeError as error:
        unknown = _unknown_option(error, name, kwargs)
        if unknown is None:
            raise
        raise unknown from None


# the options every model gets from create_model itself
_GIVEN_OPTIONS = {"self", "num_classes", "in_channels", "in_chans"}


def _unknown_option(error: TypeError, name: str, options: Mapping) -> ValueError | None:
    """A one-line error for a constructor's "unexpected keyword argument" ``error`` about one of ``options``,
    with the options the constructor takes; None for any other TypeError."""
    found = re.search(r"([\w.]+)\(\) got an unexpected keyword argument '(\w+)'", str(error))
    if found is None or found[2] not in options:
        return None
    callee, option = _rejecting_callable(error, found[1]), found[2]
    if callee is None:
        return ValueError(f"model {name!r} has no option {option!r} ({found[1]} does not take it)")
    found_name = catalog.find(name)
    unavailable = _GIVEN_OPTIONS | set(found_name[1] if found_name else ())  # options the name itself fixes
    accepted = [p.name for p in inspect.signature(callee).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in unavailable]
    close = difflib.get_close_matches(option, accepted, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"model {name!r} has no option {option!r}.{hint} The options {found[1].split('.')[0]} takes: "
                      f"{', '.join(accepted) or 'none'}")


def _rejecting_callable(error: TypeError, qualname: str) -> Callable | None:
    """The function or class method named ``qualname`` in the error message, looked up where the call failed
    (the last frame of the traceback: its module's names, then its local values, e.g. timm's ``model_cls``)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    head, *rest = qualname.split(".")
    frame = tb.tb_frame
    candidates = [frame.f_globals.get(head)] + [v for v in frame.f_locals.values()
                                                if getattr(v, "__qualname__", None) == head]
    for found in filter(None, candidates):
        for part in rest:
            found = getattr(found, part, None)
        if callable(found):
            return found
    return None


def _create_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    if name.startswith("torchvision:"):
        return _torchvision_model(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if name.startswith("hf:"):
        from featkd.models.hf import hf_model

        return hf_model(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if name.startswith("timm:"):
        return _timm_model(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if ":" in name:
        return _factory_model(name, num_classes, in_channels, **kwargs)

    found = catalog.find(name)
    if found is not None:
        factory = found[0]  # a local name: an unknown option's message finds the constructor here
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    key = name.strip().lower()
    close = difflib.get_close_matches(key.replace("-", "_"), list_models(), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}.{hint} Built-in models: {', '.join(list_models())} "
        "(wrn{depth}_{width} and resnet{depth} take any valid depth); or use 'torchvision:<name>', "
        "'timm:<name>', 'hf:<architecture>' or 'package.module:factory'.")


def _torchvision_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision classification model {name!r}.{hint}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel Conv2d with one taking ``in_channels`` (same kernel, stride, padding...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            if module.groups != 1:
                break
            conv = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, 1, module.bias is not None, module.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, conv)
            return
    raise ValueError(f"cannot adapt {type(model).__name__} to in_channels={in_channels}: "
                     "its first 3-channel Conv2d is missing or grouped; "
                     "build the model yourself and load it via 'package.module:factory'")


def _timm_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"'timm:{name}' needs the timm package: pip install timm "
                          "(or pip install 'featkd[timm]')") from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model {name!r}.{hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def _factory_model(spec: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({e}); "
                         "expected 'package.module:factory' with the package on PYTHONPATH") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}.{hint}")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # num_classes is the common keyword (torchvision factories forward it through **kwargs); in_channels is
    # not, so it goes only to factories that name it; the others get their first RGB conv adapted (a model
    # without one, e.g. an MLP, is left as the factory built it).
    if takes_any or "num_classes" in params:
        kwargs.setdefault("num_classes", num_classes)
    names_in_channels = "in_channels" in params
    if names_in_channels:
        kwargs.setdefault("in_channels", in_channels)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
    takes_rgb = any(isinstance(m, nn.Conv2d) and m.in_channels == 3 for m in model.modules())
    if in_channels != 3 and not names_in_channels and takes_rgb:
        _adapt_first_conv(model, in_channels)
    return model


def takes_tokens(model: nn.Module) -> bool:
    """Whether ``model`` reads token ids (a Hugging Face text model: its ``main_input_name`` is ``input_ids``)."""
    return getattr(unwrap(model), "main_input_name", None) == "input_ids"


def example_input(model: nn.Module, input_size: tuple[int, ...], batch: int = 1):
    """A dry-run input for ``model``: zeros of ``(batch, *input_size)``, or for a model that reads token ids
    ``{"input_ids": (batch, L)}`` of token 0 with L the last entry of ``input_size``."""
    if takes_tokens(model):
        return {"input_ids": torch.zeros(batch, input_size[-1], dtype=torch.long)}
    return torch.zeros(batch, *input_size)


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse a batch ``model`` cannot take, in one line with the fix, instead of torch's "Input type (unsigned
    char) and bias type (float) should be the same": integer images, or floats of another precision than the
    model's weights outside autocast. Token ids and other inputs that are not an image tensor pass: the
    model reads them as it reads them."""
    weight = next(model.parameters(), None)
    if not isinstance(x, torch.Tensor) or weight is None or not weight.is_floating_point():
        return
    if not x.is_floating_point():
        raise ValueError(f"the batch is {x.dtype} {tuple(x.shape)}, but models take float images: convert it with "
                         "x.float() / 255 and normalise it with the data's mean and std (featkd.data.DeviceLoader "
                         "does both)")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"the batch is {x.dtype} but the model's weights are {weight.dtype}: pass "
                         f"x.to({weight.dtype}), or train in mixed precision with featkd.engine.Precision('bf16') "
                         "(amp=bf16 in a config)")


def feature_info(model: nn.Module, layers: list[str] | None = None,
                 input_size: tuple[int, ...] | None = None) -> list[FeatureInfo]:
    """The distillable feature maps of ``model`` as ``FeatureInfo(name, channels, reduction)``.

    featkd models carry it (``model.feature_info``); timm models' own ``feature_info`` is converted.
    For any other model pass ``layers`` (module paths) and ``input_size`` (C, H, W): one dry forward
    with hooks measures them. Use ``featkd layers <model>`` to see the module paths a model has.
    """
    if layers is None:
        info = getattr(model, "feature_info", None)
        if isinstance(info, list) and all(isinstance(f, FeatureInfo) for f in info):
            return list(info)
        if info is not None and hasattr(info, "get_dicts"):  # timm's FeatureInfo object
            return [FeatureInfo(d["module"], d["num_chs"], d["reduction"]) for d in info.get_dicts()]
        if isinstance(info, list) and all(isinstance(d, dict) and "num_chs" in d for d in info):
            return [FeatureInfo(d["module"], d["num_chs"], d["reduction"]) for d in info]
        raise ValueError(
            f"{type(model).__name__} has no feature metadata: pass layers=[...] and input_size=(C, H, W) to "
            "measure them with a dry forward; run 'featkd layers <model>' to list its layer names and shapes")
    if input_size is None:
        raise ValueError("feature_info(model, layers=...) needs input_size=(C, H, W) for the dry forward")
    example = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    try:
        features = probe(model, example, layers)
    except KeyError as error:  # an unknown layer name, with the closest ones
        raise ValueError(f"{type(model).__name__}: {error}") from None
    not_run = [name for name in features if not features.calls(name)]
    if not_run:
        raise ValueError(f"layer(s) {not_run} of {type(model).__name__} did not run in the forward pass")
    height = input_size[-1]
    shapes = {name: features.calls(name)[0].shape for name in features}  # a module run twice: its first call
    return [FeatureInfo(name, shape[1], max(1, round(height / shape[-1]))) for name, shape in shapes.items()]


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel ``(mean, std)`` (0..1 scale) a model records for its input: timm's ``pretrained_cfg``
    (the normalisation of its pretrained weights), or ``None``."""
    model = unwrap(model)
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attribute, None)
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return None


def default_distill_layers(model: nn.Module) -> list[str]:
    """The natural layers for AT/NST: WRN groups, CIFAR-ResNet / torchvision-ResNet stages, NIN blocks,
    the last four of a timm model's feature stages."""
    names = getattr(model, "default_distill_layers", None)
    if isinstance(names, list):
        return list(names)
    try:
        import torchvision

        if isinstance(model, torchvision.models.ResNet):
            return ["layer1", "layer2", "layer3", "layer4"]
    except ImportError:
        pass
    try:
        info = feature_info(model)
    except ValueError:
        raise ValueError(f"no default distillation layers known for {type(model).__name__}: name them "
                         "explicitly; run 'featkd layers <model>' to list layer names and shapes") from None
    return [f.name for f in info][-4:]  # timm lists the stem (if any) first: keep the last four stages


def pre_relu_layer(model: nn.Module) -> str:
    """The layer whose output is the model's last feature map after its BN and before its ReLU — where the
    official NST code applies its loss (featkd's WRNs: ``bn``; NIN: ``block3.4``)."""
    name = getattr(model, "pre_relu_layer", None)
    if not isinstance(name, str):
        raise ValueError(f"no pre-ReLU feature layer known for {type(model).__name__}: name the layer explicitly; "
                         "run 'featkd layers <model>' to list layer names and shapes")
    return name
