"""Forward-hook feature capture: name layers of any model, get their outputs.

No forward is rewritten: each requested layer gets a forward hook (or a forward
pre-hook for ``:input``) that stores what the layer produced, keyed by the spec
the user wrote (:mod:`featkd.layer_specs` says how specs name modules, calls and
parts of outputs). :func:`probe` is featkd's one dry run: the Distiller, Deep Mutual
Learning, :func:`featkd.list_layers` and :func:`featkd.models.feature_info` read the
shapes they need from it.

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
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from featkd.batches import call_model
from featkd.layer_specs import (Spec, is_compiled, named_modules, resolve_specs, select, strip_wrappers,
                                unknown_layer_error, unwrap, wrapped_child)

__all__ = ["capture", "FeatureExtractor", "Features", "feature_shapes", "probe"]

# ----------------------------------------------------------------------------- storage


class Features(Mapping):
    """What one forward captured: ``key -> Tensor`` (keys are the specs as given, globs expanded).

    A module that ran several times in the forward stores every call:
    ``feats["blk"]`` then raises, ``feats["blk#1"]`` is the second call and
    ``feats.calls("blk")`` the list of all of them. After a :func:`probe`, ``order`` lists the keys in the
    order their calls finished (one entry per call): the forward's execution order.
    """

    def __init__(self, calls: dict[str, list], selected_call: dict[str, int | None], compiled: bool = False):
        self._calls = calls
        self._selected = selected_call
        self._compiled = compiled
        self.order: list[str] = []
        # "module.layer1" and "layer1" name the same feature, whichever the user wrote
        self._aliases = {strip_wrappers(k): k for k in calls}

    def __iter__(self) -> Iterator[str]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key) -> bool:
        return key in self._calls

    def _entries(self, key: str) -> tuple[str, list, int | None]:
        for candidate in (key, self._aliases.get(strip_wrappers(key))):
            if candidate in self._calls:
                return candidate, self._calls[candidate], self._selected[candidate]
        base, sep, call = key.rpartition("#")
        base = base if base in self._calls else self._aliases.get(strip_wrappers(base))
        if sep and call.isdigit() and base in self._calls and self._selected[base] is None:
            return base, self._calls[base], int(call)
        raise unknown_layer_error("no captured layer", key, self._calls)

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
        self.specs = resolve_specs(model, layers)
        self.detach = detach
        self.clone = clone
        self.calls: dict[str, list] = {s.key: [] for s in self.specs}
        self.selected = {s.key: s.call for s in self.specs}
        # whether the hooks store what runs: a FeatureExtractor turns this on only for its own calls, so that
        # a forward outside them (evaluation, another distiller sharing the teacher) stores nothing
        self.recording = True
        self.root_grad_enabled: bool | None = None  # grad mode at the start of the running forward
        modules = named_modules(model)
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

    def _make_hook(self, spec: Spec):
        entries = self.calls[spec.key]

        def record(value):
            if not torch.compiler.is_compiling():
                if not self.recording or _in_backward():
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
            entries.append(_store_tensors(select(value, spec.selectors, spec.key), self.detach, self.clone))

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
    compiled = [m._orig_mod if is_compiled(m) else m for m in model.modules()
                if is_compiled(m) or getattr(m, "_compiled_call_impl", None) is not None]  # nn.Module.compile()
    if not compiled:
        return
    import torch._dynamo

    for module in compiled:
        code = getattr(getattr(module.forward, "__func__", module.forward), "__code__", None)
        if code is not None:
            torch._dynamo.reset_code(code)


def _any_compiled(model: nn.Module) -> bool:
    while (child := wrapped_child(model)) is not None:
        if is_compiled(model) or getattr(model, "_compiled_call_impl", None) is not None:
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
    nothing of one step stays alive into the next. The hooks store only during ``ext(...)``: the model
    run by itself (an evaluation, another extractor's call) leaves nothing behind, however often it
    runs. Every requested layer must have run, otherwise a ``RuntimeError`` says which did not. A ``torch.compile``'d model (or one with
    compiled submodules) is retraced once so that it runs the hooks; create the extractor
    once, not per step.
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str], *, detach: bool = False,
                 no_grad: bool = False, clone: bool = True):
        self.model = model
        self.no_grad = no_grad
        self._recorder = _Recorder(model, layers, detach=detach, clone=clone)
        self._recorder.recording = False

    @property
    def layers(self) -> list[str]:
        """The resolved keys, in order (globs expanded)."""
        return [s.key for s in self._recorder.specs]

    def __call__(self, *args, **kwargs) -> tuple[Any, Features]:
        return self.run(self.model, *args, **kwargs)

    def run(self, forward, *args, **kwargs) -> tuple[Any, Features]:
        """``(forward(*args, **kwargs), features)``: what ``ext(...)`` does, with another callable running the
        model, e.g. ``torch.func.functional_call(model, weights, args)`` (:mod:`featkd.fused`)."""
        if not self._recorder.handles:
            raise RuntimeError("this FeatureExtractor was removed; create a new one")
        self.clear()
        self._recorder.recording = True
        try:
            with torch.no_grad() if self.no_grad else contextlib.nullcontext():
                output = forward(*args, **kwargs)
        except BaseException:
            self.clear()
            raise
        finally:
            self._recorder.recording = False
        features = self._recorder.take()
        for key in self.layers:  # a missing feature would otherwise surface as a loss of 0
            wanted = (self._recorder.selected[key] or 0) + 1
            if features.num_calls(key) < wanted:
                raise features._not_run(key, features.num_calls(key), wanted)
        return output, features

    def clear(self) -> None:
        """Drop whatever the hooks stored."""
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


# ----------------------------------------------------------------------------- the dry run


def probe(model: nn.Module, example_input: Any, layers: str | Sequence[str]) -> Features:
    """What ``layers`` produce in one dry-run forward of ``model`` on ``example_input``.

    The forward runs in eval mode under ``torch.no_grad()``, so nothing is updated (batch-norm
    statistics included) and every module's training flag is restored afterwards. ``example_input``
    is a tensor, a tuple of positional arguments or a dict of keyword arguments (a tokenizer's batch).
    DDP/DataParallel/compile wrappers are handled as in :func:`capture`; each layer keeps every call
    (:meth:`Features.calls`).
    """
    recorder = _Recorder(model, layers, detach=True, clone=False)
    order: list[str] = []
    modules = named_modules(model)
    for spec in recorder.specs:  # registered after the recorder's hooks, so they run right after them
        def finished(*_, key=spec.key):
            order.append(key)
        module = modules[spec.path]
        register = module.register_forward_pre_hook if spec.port == "input" else module.register_forward_hook
        recorder.handles.append(register(finished))
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
        features = recorder.take()
        features.order = order
        return features
    finally:
        recorder.remove()
        for module, flag in training.items():
            module.training = flag


def feature_shapes(model: nn.Module, layers: str | Sequence[str], example_input: Any) -> dict[str, tuple[int, ...]]:
    """The shape of each captured layer's feature in a :func:`probe` (keys as :func:`capture` gives them).

    Raises as reading a :class:`Features` does when a layer did not run, or ran several times
    without a ``#k`` call selected.
    """
    features = probe(model, example_input, layers)
    return {key: tuple(features[key].shape) for key in features}
