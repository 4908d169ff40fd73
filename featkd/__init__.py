"""featkd: feature-based knowledge distillation for PyTorch.

The public names below are imported lazily (PEP 562) so that ``import featkd``
and the command-line tool start fast; each lives in a small focused module. The same names are
imported explicitly for type checkers and editors (``TYPE_CHECKING``), which a test keeps in step.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featkd import data, functional, losses, models
    from featkd.batches import BatchFormat
    from featkd.distiller import Distiller
    from featkd.hooks import FeatureExtractor, Features, capture
    from featkd.layer_info import LayerInfo, list_layers
    from featkd.layer_pairs import propose_pairs
    from featkd.layer_specs import resolve_layers
    from featkd.layouts import Layout, to_channels_first
    from featkd.terms import Term, Warmup

__version__ = "0.1.0"

_PUBLIC = {
    "capture": "featkd.hooks",
    "FeatureExtractor": "featkd.hooks",
    "Features": "featkd.hooks",
    "LayerInfo": "featkd.layer_info",
    "list_layers": "featkd.layer_info",
    "Layout": "featkd.layouts",
    "to_channels_first": "featkd.layouts",
    "propose_pairs": "featkd.layer_pairs",
    "resolve_layers": "featkd.layer_specs",
    "Distiller": "featkd.distiller",
    "BatchFormat": "featkd.batches",
    "Term": "featkd.terms",
    "Warmup": "featkd.terms",
    "functional": "featkd.functional",
    "losses": "featkd.losses",
    "models": "featkd.models",
    "data": "featkd.data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module 'featkd' has no attribute {name!r}")
    module = import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
