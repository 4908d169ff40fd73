"""featkd's model names, registered next to each model's definition (as timm does), read by ``create_model``.

A fixed name (``register_model("nin")``) or a family of names (``register_family`` with a pattern such as
``wrn{depth}_{width}``: the name carries constructor arguments, so any valid depth works, and its listed
``examples`` are what ``list_models`` shows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Family:
    pattern: re.Pattern
    build: Callable[..., nn.Module]  # build(match, **constructor options)
    fixed: tuple[str, ...]  # constructor options the name itself sets (not available as options)


_NAMED: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: list[Family] = []


def register_model(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register ``factory(num_classes=, in_channels=, **options)`` under ``name``; usable as a decorator."""
    def add(factory):
        if name in _NAMED:
            raise ValueError(f"a model named {name!r} is already registered")
        _NAMED[name] = factory
        return factory
    return add if factory is None else add(factory)


def register_family(pattern: str, build: Callable[..., nn.Module], examples: list[str],
                    fixed: tuple[str, ...] = ()) -> None:
    """Register names matching ``pattern`` (``build(match, **options)`` builds one), listing ``examples``."""
    family = Family(re.compile(pattern), build, fixed)
    _FAMILIES.append(family)
    for example in examples:
        match = family.pattern.match(example)
        if match is None:
            raise ValueError(f"example {example!r} does not match the family's pattern {pattern!r}")
        register_model(example, lambda match=match, **options: build(match, **options))


def find(name: str) -> tuple[Callable[..., nn.Module], tuple[str, ...]] | None:
    """``(factory, options the name fixes)`` for a registered name or a family member; None if unknown."""
    key = name.strip().lower()
    for family in _FAMILIES:
        match = family.pattern.match(key)
        if match:
            return (lambda match=match, **options: family.build(match, **options)), family.fixed
    if key in _NAMED:
        return _NAMED[key], ()
    return None


def model_names() -> list[str]:
    return sorted(_NAMED)
