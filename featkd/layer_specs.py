"""Layer specs: which module of a model, and which part of what it produced, a name means.

-----------
``path[#k][:input|:output][selector...]``

* ``path`` - a dotted module path as in ``model.named_modules()``
  (``layer3.1.conv2``, ``features.4``, ``encoder.layers.encoder_layer_0``).
  Globs: ``*`` and ``?`` stay within one dotted segment, ``**`` crosses dots
  (``layer*.1.conv2``, ``blocks.*.attn``). A glob expands to one key per
  matched module, in module order. ``[...]`` is never a glob character class:
  brackets always select (below).
  The ``module.`` segment of DataParallel / DistributedDataParallel and the
  ``_orig_mod.`` segment of ``torch.compile`` are resolved transparently: the
  model may be wrapped or not and the names may carry those segments or not.
* ``#k`` - when the module runs several times in one forward (a shared block),
  only call ``k`` (0-based). Without it every call is stored; see
  :meth:`Features.calls`.
* ``:input`` / ``:output`` (default) - what the module received or returned.
  The input is the positional argument when there is exactly one, otherwise
  the tuple of positional arguments.
* selectors - pick part of a tuple / list / dict / dataclass / namedtuple:
  ``[0]`` (an index), ``["key"]`` or ``['key']`` (a mapping key, else an
  attribute), ``.attr`` (an attribute; only after a port or a bracket, e.g.
  ``head:output.logits``, ``blk[0].hidden``, since a bare ``.`` belongs to the
  module path).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LayerKeyError", "Spec", "glob_regex", "is_compiled", "named_modules", "parse_spec", "resolve_layers",
           "resolve_specs", "select", "strip_wrappers", "unknown_layer_error", "unwrap", "wrapped_child"]

_SPEC_RE = re.compile(r"^(?P<path>[^#:\[]*)(?:#(?P<call>\d+))?(?::(?P<port>input|output))?(?P<rest>.*)$")
_SELECTOR_RE = re.compile(r"\[\s*(?:(?P<index>-?\d+)|'(?P<sq>[^']*)'|\"(?P<dq>[^\"]*)\")\s*\]|\.(?P<attr>[A-Za-z_]\w*)")
_WRAPPER_SEGMENTS = ("module", "_orig_mod")


# ----------------------------------------------------------------------------- names


def is_compiled(module: nn.Module) -> bool:
    # Checked by name so that importing featkd does not import torch._dynamo.
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def wrapped_child(module: nn.Module) -> str | None:
    """Name of the child a wrapper forwards to (``module`` for DP/DDP, ``_orig_mod`` for compile)."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    if is_compiled(module):
        return "_orig_mod"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while (child := wrapped_child(model)) is not None:
        model = getattr(model, child)
    return model


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> module, with wrapper segments dropped, in ``named_modules`` order."""
    names: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        child = wrapped_child(module)
        if child is not None:  # the wrapper and what it wraps share one name
            walk(getattr(module, child), prefix)
            return
        if id(module) in seen:  # a module registered twice keeps its first name, like named_modules
            return
        seen.add(id(module))
        names[prefix] = module
        for name, sub in module.named_children():
            walk(sub, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return names


def strip_wrappers(path: str) -> str:
    return ".".join(p for p in path.split(".") if p not in _WRAPPER_SEGMENTS)


def _canonical(path: str, modules: Mapping[str, nn.Module]) -> str:
    """Drop ``module.`` / ``_orig_mod.`` segments the user wrote that the model does not have."""
    return path if path in modules else strip_wrappers(path)


def glob_regex(pattern: str) -> re.Pattern:
    """Regex for a layer glob: ``*`` and ``?`` stay within one dotted segment, ``**`` crosses dots."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


class LayerKeyError(KeyError):
    """A KeyError whose message prints as written (KeyError alone shows its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_layer_error(what: str, name: str, candidates: Iterable[str]) -> KeyError:
    candidates = [c for c in candidates if c]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    hint = f" Closest existing names: {', '.join(close)}." if close else ""
    return LayerKeyError(f"{what} {name!r}.{hint} featkd.list_layers(model, x) (featkd layers <model> on the command line) lists them all.")


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str                      # the spec as given (a glob replaced by the matched name)
    path: str                     # canonical module path
    call: int | None              # select one call of a module that runs several times
    port: str                     # "input" or "output"
    selectors: tuple[tuple[str, Any], ...]  # ("item", 0) / ("item", "key") / ("attr", "name")


def parse_spec(spec: str) -> tuple[str, str, int | None, str, tuple]:
    """``spec`` -> (module path, the rest of the spec after it, call, port, selectors)."""
    if not isinstance(spec, str):
        raise TypeError(f"layer specs are strings like 'layer3' or 'layer3:input', got {spec!r}")
    spec = spec.strip()
    m = _SPEC_RE.match(spec)
    path, call, port, rest = m["path"], m["call"], m["port"] or "output", m["rest"]
    selectors = []
    pos = 0
    while pos < len(rest):
        s = _SELECTOR_RE.match(rest, pos)
        if s is None or (s["attr"] is not None and pos == 0 and m["port"] is None):
            raise ValueError(
                f"cannot parse layer spec {spec!r} at {rest[pos:]!r}: expected path[#k][:input|:output] followed by "
                "selectors [0], ['key'] or .attr (an .attr needs a port or a bracket before it, e.g. "
                "'head:output.logits')"
            )
        if s["index"] is not None:
            selectors.append(("item", int(s["index"])))
        elif s["attr"] is not None:
            selectors.append(("attr", s["attr"]))
        else:
            selectors.append(("item", s["sq"] if s["sq"] is not None else s["dq"]))
        pos = s.end()
    if not path:
        raise ValueError(f"layer spec {spec!r} names no module")
    return path, spec[len(path):], int(call) if call is not None else None, port, tuple(selectors)


def resolve_specs(model: nn.Module, layers: str | Sequence[str]) -> list[Spec]:
    if isinstance(layers, str):
        layers = [layers]
    modules = named_modules(model)
    specs: list[Spec] = []
    for given in layers:
        written, suffix, call, port, selectors = parse_spec(given)
        path = _canonical(written, modules)
        if any(c in path for c in "*?"):
            regex = glob_regex(path)
            matched = [name for name in modules if name and regex.match(name)]
            if not matched:
                raise unknown_layer_error("no module matches the pattern", path, modules)
            specs += [Spec(name + suffix, name, call, port, selectors) for name in matched]
        elif path in modules:
            specs.append(Spec(given.strip(), path, call, port, selectors))
        else:
            raise unknown_layer_error("the model has no module named", path, modules)
    keys = [s.key for s in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"layers requested more than once: {duplicates}")
    return specs


def resolve_layers(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Expand layer specs (globs, wrapper prefixes) into the keys they produce, in order.

    ``resolve_layers(resnet, ["layer*"])`` -> ``["layer1", "layer2", "layer3", "layer4"]``.
    Raises ``KeyError`` listing the closest module names when a name or pattern matches nothing.
    """
    return [s.key for s in resolve_specs(model, patterns)]


def select(value: Any, selectors: tuple, key: str) -> Any:
    """The part of a module's ``value`` (input or output) that a spec's ``selectors`` pick."""
    for kind, sel in selectors:
        try:
            if kind == "attr":
                value = getattr(value, sel)
            elif isinstance(sel, str) and not isinstance(value, Mapping):
                value = getattr(value, sel)  # ["name"] on a dataclass / namedtuple / ModelOutput
            else:
                value = value[sel]
        except (KeyError, IndexError, AttributeError, TypeError):
            raise LayerKeyError(f"layer spec {key!r}: cannot select {sel!r} from a {_describe(value)}") from None
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)}"
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__} with fields {[f.name for f in dataclasses.fields(value)]}"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return f"{type(value).__name__} with fields {list(value._fields)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__
