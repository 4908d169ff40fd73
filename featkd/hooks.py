"""Forward-hook feature capture: name layers of any model, get their outputs.

No forward is rewritten: each requested layer gets a forward hook (or a forward
pre-hook for ``:input``) that stores what the layer produced, keyed by the spec
the user wrote.

Layer specs
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

Memory and in-place operations
------------------------------
``clone=True`` (the default) stores a copy of every captured tensor. A stored
tensor that is *not* cloned shares storage with the model's activation, and an
in-place op that runs later in the forward (``ReLU(inplace=True)``,
``out += identity``) silently overwrites it. The copy costs one extra
activation per captured call; ``clone=False`` saves it when the captured layer
is known to be followed by no in-place op. The clone is differentiable, so
student features keep their autograd graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["capture", "FeatureExtractor", "Features", "LayerInfo", "list_layers", "resolve_layers"]

_SPEC_RE = re.compile(r"^(?P<path>[^#:\[]*)(?:#(?P<call>\d+))?(?::(?P<port>input|output))?(?P<rest>.*)$")
_SELECTOR_RE = re.compile(r"\[\s*(?:(?P<index>-?\d+)|'(?P<sq>[^']*)'|\"(?P<dq>[^\"]*)\")\s*\]|\.(?P<attr>[A-Za-z_]\w*)")
_WRAPPER_SEGMENTS = ("module", "_orig_mod")


# ----------------------------------------------------------------------------- names


def _is_compiled(module: nn.Module) -> bool:
    # Checked by name so that importing featkd does not import torch._dynamo.
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _wrapped_child(module: nn.Module) -> str | None:
    """Name of the child a wrapper forwards to (``module`` for DP/DDP, ``_orig_mod`` for compile)."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    if _is_compiled(module):
        return "_orig_mod"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while (child := _wrapped_child(model)) is not None:
        model = getattr(model, child)
    return model


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> module, with wrapper segments dropped, in ``named_modules`` order."""
    names: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        child = _wrapped_child(module)
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


def _strip_wrappers(path: str) -> str:
    return ".".join(p for p in path.split(".") if p not in _WRAPPER_SEGMENTS)


def _canonical(path: str, modules: Mapping[str, nn.Module]) -> str:
    """Drop ``module.`` / ``_orig_mod.`` segments the user wrote that the model does not have."""
    return path if path in modules else _strip_wrappers(path)


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


def _unknown(what: str, name: str, candidates: Iterable[str]) -> KeyError:
    candidates = [c for c in candidates if c]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    hint = f" Closest existing names: {', '.join(close)}." if close else ""
    return LayerKeyError(f"{what} {name!r}.{hint} featkd.list_layers(model, x) lists them all.")


@dataclasses.dataclass(frozen=True)
class _Spec:
    key: str                      # the spec as given (a glob replaced by the matched name)
    path: str                     # canonical module path
    call: int | None              # select one call of a module that runs several times
    port: str                     # "input" or "output"
    selectors: tuple[tuple[str, Any], ...]  # ("item", 0) / ("item", "key") / ("attr", "name")


def _parse(spec: str) -> tuple[str, str, int | None, str, tuple]:
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


def _resolve_specs(model: nn.Module, layers: str | Sequence[str]) -> list[_Spec]:
    if isinstance(layers, str):
        layers = [layers]
    modules = _named_modules(model)
    specs: list[_Spec] = []
    for given in layers:
        written, suffix, call, port, selectors = _parse(given)
        path = _canonical(written, modules)
        if any(c in path for c in "*?"):
            regex = glob_regex(path)
            matched = [name for name in modules if name and regex.match(name)]
            if not matched:
                raise _unknown("no module matches the pattern", path, modules)
            specs += [_Spec(name + suffix, name, call, port, selectors) for name in matched]
        elif path in modules:
            specs.append(_Spec(given.strip(), path, call, port, selectors))
        else:
            raise _unknown("the model has no module named", path, modules)
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
    return [s.key for s in _resolve_specs(model, patterns)]


# ----------------------------------------------------------------------------- storage


class Features(Mapping):
    """What one forward captured: ``key -> Tensor`` (keys are the specs as given, globs expanded).

    A module that ran several times in the forward stores every call:
    ``feats["blk"]`` then raises, ``feats["blk#1"]`` is the second call and
    ``feats.calls("blk")`` the list of all of them.
    """

    def __init__(self, calls: dict[str, list], selected_call: dict[str, int | None], compiled: bool = False):
        self._calls = calls
        self._selected = selected_call
        self._compiled = compiled
        # "module.layer1" and "layer1" name the same feature, whichever the user wrote
        self._aliases = {_strip_wrappers(k): k for k in calls}

    def __iter__(self) -> Iterator[str]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key) -> bool:
        return key in self._calls

    def _entries(self, key: str) -> tuple[str, list, int | None]:
        for candidate in (key, self._aliases.get(_strip_wrappers(key))):
            if candidate in self._calls:
                return candidate, self._calls[candidate], self._selected[candidate]
        base, sep, call = key.rpartition("#")
        base = base if base in self._calls else self._aliases.get(_strip_wrappers(base))
        if sep and call.isdigit() and base in self._calls and self._selected[base] is None:
            return base, self._calls[base], int(call)
        raise _unknown("no captured layer", key, self._calls)

    def _not_run(self, key: str, ran: int, wanted: int) -> RuntimeError:
        msg = f"layer {key!r} ran {ran} time(s) in the last forward, {wanted} needed."
        if ran == 0:
            msg += " Is it on the path this forward takes (train/eval mode, branches), and was the forward run?"
            if self._compiled or "torch._dynamo" in sys.modules:
                msg += (
                    " If the forward runs inside torch.compile: hooks added after the first compiled call are never "
                    "run (dynamo does not guard on hooks). featkd retraces compiled modules it is given, but not a "
                    "compiled function that calls the model: create the extractor before its first call, or call "
                    "torch.compiler.reset() after creating it."
                )
        return RuntimeError(msg)

    def __getitem__(self, key: str) -> torch.Tensor:
        base, entries, call = self._entries(key)
        if call is None:
            if len(entries) > 1:
                msg = (f"layer {key!r} ran {len(entries)} times in one forward (a shared module); pick one call "
                       f"with '{key}#k' (k = 0..{len(entries) - 1}) or take all with features.calls({key!r})")
                devices = {e.device for e in entries if isinstance(e, torch.Tensor)}
                if len(devices) > 1:
                    msg += (f". The calls are on {len(devices)} devices: nn.DataParallel runs the hooks once per "
                            "replica on its shard of the batch; torch.cat(features.calls(key)) in device order "
                            "joins them, and DistributedDataParallel avoids the issue")
                raise RuntimeError(msg)
            if not entries:
                raise self._not_run(key, 0, 1)
            return entries[0]
        if len(entries) <= call:
            raise self._not_run(key, len(entries), call + 1)
        return entries[call]

    def calls(self, key: str) -> list[torch.Tensor]:
        """Every call of ``key`` in the last forward, in order (one element for ``name#k`` keys)."""
        base, entries, call = self._entries(key)
        if call is None:
            return list(entries)
        return [self[key]]

    def num_calls(self, key: str) -> int:
        """How many times the module behind ``key`` ran in the last forward."""
        return len(self._entries(key)[1])

    def clear(self) -> None:
        """Drop every stored tensor (the keys stay)."""
        for entries in self._calls.values():
            entries.clear()

    def __repr__(self) -> str:
        def describe(entries):
            shapes = [tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__ for e in entries if e is not None]
            return shapes[0] if len(shapes) == 1 else shapes
        return "Features({" + ", ".join(f"{k!r}: {describe(v)}" for k, v in self._calls.items()) + "})"


def _select(value: Any, selectors: tuple, key: str) -> Any:
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


def _store_tensors(value: Any, detach: bool, clone: bool) -> Any:
    """Detach and/or clone every tensor in a (possibly nested) value; ``clone`` keeps autograd."""
    if isinstance(value, torch.Tensor):
        if detach:
            value = value.detach()
        return value.clone() if clone else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_store_tensors(v, detach, clone) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_store_tensors(v, detach, clone) for v in value)
    if isinstance(value, dict):
        return {k: _store_tensors(v, detach, clone) for k, v in value.items()}
    return value


def _in_backward() -> bool:
    # Activation checkpointing re-runs the forward inside the autograd engine; a hook that fires
    # there is a recomputation, whose result the first forward already stored.
    return torch._C._current_graph_task_id() != -1


class _Recorder:
    """Owns the hooks and the per-key lists they append to (the same list objects for the
    recorder's lifetime, so that a torch.compile'd graph keeps writing to them)."""

    def __init__(self, model: nn.Module, layers: str | Sequence[str], *, detach: bool, clone: bool):
        self.model = model
        self.specs = _resolve_specs(model, layers)
        self.detach = detach
        self.clone = clone
        self.calls: dict[str, list] = {s.key: [] for s in self.specs}
        self.selected = {s.key: s.call for s in self.specs}
        self.root_grad_enabled: bool | None = None  # grad mode at the start of the running forward
        modules = _named_modules(model)
        root = modules[""]
        self.handles = [root.register_forward_pre_hook(self._root_pre_hook),
                        root.register_forward_hook(self._root_hook, always_call=True)]
        try:
            for spec in self.specs:
                module = modules[spec.path]
                hook = self._make_hook(spec)
                if spec.port == "input":
                    self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    self.handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        _forget_compiled_code(model)

    def _root_pre_hook(self, module, args):
        if not torch.compiler.is_compiling():
            self.root_grad_enabled = torch.is_grad_enabled()

    def _root_hook(self, module, args, output):
        if not torch.compiler.is_compiling():
            self.root_grad_enabled = None

    def _make_hook(self, spec: _Spec):
        entries = self.calls[spec.key]

        def record(value):
            if not torch.compiler.is_compiling():
                if _in_backward():
                    return
                if not self.detach and self.root_grad_enabled is True and not torch.is_grad_enabled():
                    raise RuntimeError(
                        f"layer {spec.key!r} ran with autograd off inside a forward that had it on, so its captured "
                        "feature would have no graph and a loss on it would silently give no gradient. This is what "
                        "torch.utils.checkpoint(..., use_reentrant=True) does; use use_reentrant=False, capture a "
                        "layer outside the checkpointed segment, or pass detach=True if no gradient is wanted."
                    )
            if spec.call is not None and len(entries) != spec.call:
                entries.append(None)  # keep counting calls; store only the selected one
                return
            entries.append(_store_tensors(_select(value, spec.selectors, spec.key), self.detach, self.clone))

        if spec.port == "input":
            def pre_hook(module, args, kwargs):
                record(args[0] if len(args) == 1 else (args if args else kwargs))
            return pre_hook

        def hook(module, args, output):
            record(output)
        return hook

    def features(self) -> Features:
        return Features(self.calls, self.selected, compiled=_any_compiled(self.model))

    def take(self) -> Features:
        """Hand the stored features over and keep no reference to them."""
        taken = {k: list(v) for k, v in self.calls.items()}
        self.clear()
        return Features(taken, dict(self.selected), compiled=_any_compiled(self.model))

    def clear(self) -> None:
        for entries in self.calls.values():
            entries.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _forget_compiled_code(model: nn.Module) -> None:
    """Make torch.compile'd parts of ``model`` retrace, so that they run the hooks just added.

    Dynamo does not guard on hooks (``skip_nnmodule_hook_guards``): code compiled before the
    hooks existed would run without them forever. Dropping the cached code of each compiled
    module's ``forward`` costs one recompile (also for other instances of the same class).
    """
    compiled = [m._orig_mod if _is_compiled(m) else m for m in model.modules()
                if _is_compiled(m) or getattr(m, "_compiled_call_impl", None) is not None]  # nn.Module.compile()
    if not compiled:
        return
    import torch._dynamo

    for module in compiled:
        code = getattr(getattr(module.forward, "__func__", module.forward), "__code__", None)
        if code is not None:
            torch._dynamo.reset_code(code)


def _any_compiled(model: nn.Module) -> bool:
    while (child := _wrapped_child(model)) is not None:
        if _is_compiled(model) or getattr(model, "_compiled_call_impl", None) is not None:
            return True
        model = getattr(model, child)
    return getattr(model, "_compiled_call_impl", None) is not None


# ----------------------------------------------------------------------------- public API


@contextlib.contextmanager
def capture(model: nn.Module, layers: str | Sequence[str], *, detach: bool = False, clone: bool = True):
    """Capture the named layers during the forwards run inside the ``with`` block.

    >>> with featkd.capture(model, ["layer1", "layer3:input", "layer*.1.conv2"]) as feats:
    ...     logits = model(x)
    >>> feats["layer1"].shape

    Each forward appends to the same :class:`Features` (several forwards in one block
    look like a module that ran several times). The hooks are removed when the block
    exits, also when the forward raises; the features stay readable afterwards.
    See the module docstring for the spec syntax and the ``clone`` trade-off.
    """
    recorder = _Recorder(model, layers, detach=detach, clone=clone)
    try:
        yield recorder.features()
    finally:
        recorder.remove()


class FeatureExtractor:
    """Long-lived feature capture for training loops.

    >>> teacher_ext = FeatureExtractor(teacher, ["layer2", "layer3"], no_grad=True, detach=True)
    >>> student_ext = FeatureExtractor(student, ["layer2", "layer3"])
    >>> _, f_t = teacher_ext(x); logits, f_s = student_ext(x)

    ``ext(x)`` clears, runs ``model(x)`` (under ``torch.no_grad()`` when ``no_grad``), and
    returns ``(output, features)``; the extractor keeps no reference to the features, so
    nothing of one step stays alive into the next. Every requested layer must have run,
    otherwise a ``RuntimeError`` says which did not. A ``torch.compile``'d model (or one with
    compiled submodules) is retraced once so that it runs the hooks; create the extractor
    once, not per step.
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str], *, detach: bool = False,
                 no_grad: bool = False, clone: bool = True):
        self.model = model
        self.no_grad = no_grad
        self._recorder = _Recorder(model, layers, detach=detach, clone=clone)

    @property
    def layers(self) -> list[str]:
        """The resolved keys, in order (globs expanded)."""
        return [s.key for s in self._recorder.specs]

    def __call__(self, *args, **kwargs) -> tuple[Any, Features]:
        if not self._recorder.handles:
            raise RuntimeError("this FeatureExtractor was removed; create a new one")
        self.clear()
        try:
            with torch.no_grad() if self.no_grad else contextlib.nullcontext():
                output = self.model(*args, **kwargs)
        except BaseException:
            self.clear()
            raise
        features = self._recorder.take()
        for key in self.layers:  # a missing feature would otherwise surface as a loss of 0
            wanted = (self._recorder.selected[key] or 0) + 1
            if features.num_calls(key) < wanted:
                raise features._not_run(key, features.num_calls(key), wanted)
        return output, features

    def clear(self) -> None:
        """Drop whatever the hooks stored (e.g. after calling ``ext.model`` directly)."""
        self._recorder.clear()

    def remove(self) -> None:
        """Remove every hook; the extractor cannot be used afterwards."""
        self._recorder.clear()
        self._recorder.remove()

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureExtractor({type(unwrap(self.model)).__name__}, layers={self.layers})"


# ----------------------------------------------------------------------------- list_layers


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
    modules = _named_modules(model)
    first: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def make_hook(name):
        def hook(module, args, output):
            counts[name] = counts.get(name, 0) + 1
            first.setdefault(name, output)
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items() if n]
    training = {m: m.training for m in modules.values()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    in_hw = tuple(args[0].shape[2:]) if isinstance(args[0], torch.Tensor) and args[0].dim() >= 3 else None
    return [_layer_info(n, modules[n], first[n], counts[n], in_hw) for n in modules if n in first]
