"""Typed dataclasses from plain data (as loaded from YAML): every value checked against its field's type and
range, an unknown key refused with the closest valid ones. :mod:`featkd.config` builds its configs with it, and
the strategies their own config sections.

A field's range is in its metadata: ``field(default=0.1, metadata={"above": 0})``, its allowed values
``metadata={"choices": (...)}``; ``min`` / ``max`` include the
bound, ``above`` / ``below`` exclude it, ``finite: True`` refuses infinities (NaN is outside every range), and
a list's items are checked one by one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _holds_keys(tp: Any, value: Any) -> bool:
    """Whether dataclass ``tp`` has a field for every key of the mapping ``value``."""
    return (dataclasses.is_dataclass(tp) and isinstance(value, dict)
            and set(value) <= {f.name for f in dataclasses.fields(tp)})


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and, for dataclasses, built as) type ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _wrong_type(key, tp, value)
        # A mapping is meant for a dataclass member (the one whose fields hold its keys); anything else for the
        # plain types first.
        ordered = sorted((a for a in args if a is not type(None)),
                         key=lambda a: (dataclasses.is_dataclass(a) != isinstance(value, dict), not _holds_keys(a, value)))
        for arg in ordered:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # an unknown key inside the mapping is the real problem
        raise _wrong_type(key, tp, value) from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong_type(key, tp, value)
        return build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(key, tp, value)
        return dict(value)
    if tp in (bool, int, str):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):  # True is an int to Python
            raise _wrong_type(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _wrong_type(key, tp, value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(key, tp, value)
        return float(value)
    raise TypeError(f"config schema has an unsupported type {tp!r} at {key!r}")


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    """``cls`` built from ``data``, every value checked against its field's type and range
    (``field(metadata={"min": 1})``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            where = f" in {prefix!r}" if prefix else ""
            hint = f" Did you mean {', '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}.{hint} Valid keys{where}: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], full)
        _check_bounds(full, kwargs[key], fields[key].metadata)
        choices = fields[key].metadata.get("choices")
        if choices is not None and kwargs[key] not in choices:
            close = difflib.get_close_matches(str(kwargs[key]), list(map(str, choices)), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config key {full!r} must be one of {', '.join(map(repr, choices))}, "
                              f"got {kwargs[key]!r}.{hint}")
    return cls(**kwargs)


# A field's range, in its metadata: the sign in messages and the test, by bound ("finite": True refuses inf too)
_BOUNDS = {"min": (">=", lambda v, b: v >= b), "above": (">", lambda v, b: v > b),
           "max": ("<=", lambda v, b: v <= b), "below": ("<", lambda v, b: v < b),
           "finite": ("", lambda v, b: not b or math.isfinite(v))}


def _check_bounds(key: str, value: Any, metadata: Mapping[str, Any]) -> None:
    """Refuse a number (or a list item) outside its field's range; NaN is outside every range. Values of
    another kind (None, a mapping such as a :class:`WarmupConfig`) have their own checks."""
    bounds = {name: metadata[name] for name in _BOUNDS if name in metadata}
    if not bounds:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_bounds(f"{key}.{i}", item, metadata)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not all(_BOUNDS[name][1](value, bound) for name, bound in bounds.items()):
        raise ConfigError(f"config key {key!r} must be {_range_text(bounds)}, got {value!r}")


def _range_text(bounds: Mapping[str, Any]) -> str:
    """``at least 1``, ``> 0``, ``in [0, 1)``, ``a finite number > 0``: a field's range as its error message
    says it."""
    low = next(((name, bounds[name]) for name in ("min", "above") if name in bounds), None)
    high = next(((name, bounds[name]) for name in ("max", "below") if name in bounds), None)
    if low and high:
        text = f"in {'[' if low[0] == 'min' else '('}{low[1]}, {high[1]}{']' if high[0] == 'max' else ')'}"
    elif low or high:
        name, bound = low or high
        text = f"at least {bound}" if name == "min" and not bounds.get("finite") else f"{_BOUNDS[name][0]} {bound}"
    else:
        text = ""
    return f"a finite number {text}".strip() if bounds.get("finite") else text
