"""The reference codes' published settings, read once from ``featkd/configs/reference/published.yaml``.

Every place that trains "as the paper did" — the protocols of ``featkd repro``, the limited-data recipes,
``featkd pairs``' suggested config, the published candidate of ``featkd tune`` — takes its numbers from
here, so a published weight is written in one place and a report can name its source.
"""

from __future__ import annotations

import functools
from typing import Any

from featkd.config import CONFIG_DIR, ConfigError, read_yaml

PUBLISHED_PATH = CONFIG_DIR / "reference" / "published.yaml"


@functools.cache
def _settings() -> dict[str, dict[str, Any]]:
    data = read_yaml(PUBLISHED_PATH)
    if set(data) != {"terms", "logits", "gains"}:
        raise ConfigError(f"{PUBLISHED_PATH}: expected the sections ['gains', 'logits', 'terms'], got {sorted(data)}")
    return data


def published_losses() -> list[str]:
    """The feature losses with a published weight."""
    return sorted(_settings()["terms"])


def term_weight(loss: str) -> float:
    """The published weight of a feature term with ``loss`` (``"at"``: AT's β, ``"nst"``: NST's weight)."""
    terms = _settings()["terms"]
    if loss not in terms:
        raise ConfigError(f"no published weight for loss {loss!r}; published: {sorted(terms)} "
                          f"({PUBLISHED_PATH}); give the weight as a number")
    return float(terms[loss]["weight"])


def logit_setting(name: str) -> tuple[dict[str, Any], float]:
    """``(kd, ce_weight)`` of a published logit setting (``"kd_at"``, ``"kd_nst"``): the ``kd`` section in config
    form (:class:`featkd.config.KDConfig` data) and the cross-entropy's weight beside it."""
    logits = _settings()["logits"]
    if name not in logits:
        raise ConfigError(f"no published logit setting {name!r}; published: {sorted(logits)} ({PUBLISHED_PATH})")
    entry = logits[name]
    return dict(entry["kd"]), float(entry["ce_weight"])


def distiller_kd(name: str) -> tuple[dict[str, Any], float]:
    """``(kd, ce_weight)`` of a published logit setting in the form :class:`featkd.Distiller` takes
    (``{"loss": "kd", "weight": 0.9, "T": 4}``)."""
    kd, ce_weight = logit_setting(name)
    return {"loss": kd["loss"], "weight": kd["weight"], **kd.get("options", {})}, ce_weight


def gain(method: str) -> tuple[float, str] | None:
    """``(points, source)``: the published gain over the student alone of the method a table row names
    (``"AT"``, ``"NST-poly"``, ``"KD-tuned"``: the family before the first hyphen); None for a method without one."""
    entry = _settings()["gains"].get(method.split("-")[0])
    return None if entry is None else (float(entry["gain"]), str(entry["source"]))


def source(section: str, name: str) -> str:
    """Where a published setting comes from, in words."""
    return str(_settings()[section][name]["source"])


def resolve_term_weights(terms: list, where: str) -> list:
    """``terms`` (config data) with every ``weight: published`` replaced by its loss's published weight, so that a
    config can say "as the reference code" without copying the number; other entries are left as they are."""
    resolved = []
    for term in terms:
        if isinstance(term, dict) and term.get("weight") == "published":
            if term.get("loss") not in published_losses():
                raise ConfigError(f"{where}: 'weight: published', but loss {term.get('loss')!r} has no published "
                                  f"weight (published: {', '.join(published_losses())}); give the weight as a number")
            term = {**term, "weight": term_weight(term["loss"])}
        resolved.append(term)
    return resolved
