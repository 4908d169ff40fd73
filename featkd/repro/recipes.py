"""Recipes as data: each table's published settings, read from ``featkd/configs/recipes/<table>.yaml``.

A recipe is the config form of a distiller — :class:`featkd.config.TermConfig` terms, a ``kd`` section,
``ce_weight`` — plus where its numbers come from. The tables, the demo and ``featkd tune`` read the
same file, so a published weight is written once; a tuned recipe is the published one with
:meth:`RecipeSpec.with_changes` applied, and every student's run records the recipe it trained with
(:meth:`RecipeSpec.record`), so its numbers can be traced to its settings.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from featkd import published
from featkd.config import CONFIG_DIR, ConfigError, KDConfig, TermConfig, build_dataclass, read_yaml, to_dict
from featkd.repro.protocols import Recipe

RECIPE_DIR = CONFIG_DIR / "recipes"
RECIPE_KEYS = ("source", "terms", "kd", "ce_weight")


@dataclass(frozen=True)
class RecipeSpec:
    """One recipe: its terms and logit term in config form, the CE's weight, and the source of its numbers."""

    name: str
    terms: tuple[dict, ...] = ()  # TermConfig data
    kd: dict | None = None  # KDConfig data
    ce_weight: float = 1.0
    source: str = ""
    changes: Mapping[str, Any] = field(default_factory=dict)  # what tuning changed from the published recipe

    def __post_init__(self):
        for i, term in enumerate(self.terms):  # type-checked now, so a bad file fails before any training
            build_dataclass(TermConfig, dict(term), f"{self.name}.terms.{i}")
        if self.kd is not None:
            build_dataclass(KDConfig, dict(self.kd), f"{self.name}.kd")

    @property
    def is_student_alone(self) -> bool:
        return not self.terms and self.kd is None

    def term_configs(self) -> list[TermConfig]:
        return [build_dataclass(TermConfig, dict(t)) for t in self.terms]

    def kd_config(self) -> KDConfig | None:
        return None if self.kd is None else build_dataclass(KDConfig, dict(self.kd))

    def to_recipe(self, display_name: str | None = None) -> Recipe:
        """The :class:`~featkd.repro.protocols.Recipe` the student sweeps train (terms name WRN layers directly)."""
        from featkd.runs import distiller_losses

        name = display_name or self.name
        if self.is_student_alone:
            return Recipe(name, None)
        return Recipe(name, lambda s_layers, t_layers: distiller_losses(self.term_configs(), self.kd_config(),
                                                                        self.ce_weight))

    def record(self) -> dict:
        """The recipe in full, as a student's run config stores it."""
        return {"recipe": self.name, "terms": [to_dict(t) for t in self.term_configs()],
                "kd": None if self.kd is None else to_dict(self.kd_config()), "ce_weight": self.ce_weight,
                "source": self.source, "changes": dict(self.changes)}

    def training(self) -> dict:
        """What of :meth:`record` decides how a student trains (its losses and weights; the length is the sweep's)."""
        return {k: v for k, v in self.record().items() if k not in ("recipe", "source", "changes")}

    def trains_as(self, other: RecipeSpec, default_epochs: int) -> bool:
        """Whether this recipe trains a student exactly as ``other`` does (the same losses, weights and length):
        its numbers are then ``other``'s, seed for seed, and it need not be trained again."""
        def length(spec):
            return int(spec.changes.get("epochs", default_epochs))
        return self.training() == other.training() and length(self) == length(other)

    def with_changes(self, changes: Mapping[str, Any]) -> RecipeSpec:
        """This recipe with ``changes`` applied: ``weight.relative_to_ce`` (every term's weight as that ratio to the
        CE, :class:`featkd.calibration.RelativeToCE`), ``weight.scale`` (every term's weight times it),
        ``options.<key>`` (every term's loss option), ``kd.<key>`` (``kd.weight``, ``kd.T``...), ``ce_weight``.
        ``epochs`` is the student's training length, applied by whoever trains it; it is kept in ``changes``."""
        terms = [copy.deepcopy(dict(t)) for t in self.terms]
        kd = copy.deepcopy(self.kd)
        ce_weight = self.ce_weight
        for key, value in changes.items():
            head, _, rest = key.partition(".")
            if key == "weight.relative_to_ce":
                for t in terms:
                    t["weight"] = {"relative_to_ce": value}
            elif key == "weight.scale":
                for t in terms:
                    t["weight"] = float(t.get("weight", 1.0)) * value
            elif head == "options" and rest:
                for t in terms:
                    t.setdefault("options", {})[rest] = value
            elif head == "kd" and rest and kd is not None:
                if rest in ("weight", "loss"):
                    kd[rest] = value
                else:
                    kd.setdefault("options", {})[rest] = value
            elif key == "ce_weight":
                ce_weight = value
            elif key != "epochs":
                raise ConfigError(f"recipe {self.name}: cannot apply {key!r}; known changes: weight.relative_to_ce, "
                                  "weight.scale, options.<loss option>, kd.<weight|T|...>, ce_weight, epochs")
        return dataclasses.replace(self, terms=tuple(terms), kd=kd, ce_weight=ce_weight,
                                   changes={**self.changes, **changes})


def recipes_path(table: str) -> Path:
    return RECIPE_DIR / f"{table}.yaml"


def load_recipes(table: str) -> dict[str, RecipeSpec]:
    """``{name: RecipeSpec}`` of ``featkd/configs/recipes/<table>.yaml``, in the file's order."""
    path = recipes_path(table)
    data = read_yaml(path)
    recipes = {}
    for name, entry in data.items():
        entry = entry or {}
        unknown = sorted(set(entry) - set(RECIPE_KEYS))
        if unknown:
            raise ConfigError(f"{path}: recipe {name!r} has unknown keys {unknown}; a recipe has {list(RECIPE_KEYS)}")
        terms = tuple(published.resolve_term_weights(list(entry.get("terms") or ()), f"{path}: {name}"))
        kd, ce_weight = entry.get("kd"), entry.get("ce_weight")
        if isinstance(kd, str):  # a published logit setting by name: its kd section and its CE weight
            kd, published_ce = published.logit_setting(kd)
            ce_weight = published_ce if ce_weight is None else ce_weight
        recipes[str(name)] = RecipeSpec(str(name), terms, kd, float(1.0 if ce_weight is None else ce_weight),
                                        str(entry.get("source", "")).strip())
    return recipes

