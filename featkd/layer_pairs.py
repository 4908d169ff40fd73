"""Proposed (teacher layer, student layer) pairs for two backbones: what ``featkd pairs`` prints.

>>> pairs = propose_pairs(teacher, student, torch.zeros(1, 3, 224, 224))
>>> [(p.teacher.name, p.student.name, p.match) for p in pairs]
[('layer1', 'layer1', 'stride 4'), ..., ('layer4', 'layer4', 'stride 32, last feature')]
>>> pair_terms(pairs, loss="at")   # the ``terms:`` of a featkd distill config, at AT's published β

One dry run per model (:func:`featkd.list_layers`) gives every module's output with its layout. The
model is read as a chain: its top-level modules, with a ``Sequential`` of stages (``features``,
``stages``, ``layers``: children at three or more resolutions) opened up. Its **stages** are its
resolutions: for each feature grid, the last module of the chain with parameters to produce it
(``layer3``, ``features.5``, Swin's final ``norm``) before the global pooling (a ``*pool*`` module
giving 1×1, or the first (B, C) vector); the stem (stride < 4) is left out when three or more stages
remain. Two multi-stage models pair their stages of equal grid, and their last stages (the last
feature before pooling) in any case. A model with one resolution (a ViT; a text transformer, whose
token sequence has no grid) has repeated blocks: the children of one container, all of one type. It
spreads them over the other model's stages by depth (stage j of k gets block ``ceil(j·L/k)`` of L), its
last feature going to the other's last stage; two such models pair every block of the shallower one,
block m of M with block ``ceil(m·N/M)`` of the deeper one's N (TinyBERT's uniform mapping: 2 of 4 blocks
pair with 2 and 4). Feature widths may differ: the term's loss or its adapter handles them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import nn

from featkd.batches import batch_size
from featkd.layer_info import LayerInfo, list_layers
from featkd.layer_specs import named_modules

__all__ = ["LayerPair", "model_stages", "pair_terms", "propose_pairs"]

_MIN_STRIDE = 4  # stages at a smaller stride are the stem, left out when three or more stages remain


class LayerPair(NamedTuple):
    """A proposed pair: the teacher's and the student's :class:`~featkd.LayerInfo` and why they match."""

    teacher: LayerInfo
    student: LayerInfo
    match: str


class _Stages(NamedTuple):
    stages: list[LayerInfo]  # one per resolution, finest first
    blocks: list[LayerInfo]  # the repeated blocks of a single-resolution model


def _stride(info: LayerInfo) -> float:
    stride = info.stride
    return min(stride) if isinstance(stride, tuple) else stride


def _chain(model: nn.Module, infos: Sequence[LayerInfo]) -> list[LayerInfo]:
    """The model as a chain of modules: the root's children, a ``Sequential`` of stages (children giving three or
    more grids: ``features``, ``stages``, ``layers``) replaced by its children, in the order they finished."""
    by_name = {info.name: info for info in infos}
    modules = named_modules(model)

    def grids(name: str) -> set:
        prefix = f"{name}." if name else ""
        return {by_name[f"{prefix}{child}"].grid for child, _ in modules[name].named_children()
                if f"{prefix}{child}" in by_name and by_name[f"{prefix}{child}"].grid is not None}

    def expand(name: str) -> list[str]:
        prefix = f"{name}." if name else ""
        names = []
        for child, module in modules[name].named_children():
            full = f"{prefix}{child}"
            if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(grids(full)) >= 3:
                names += expand(full)
            elif full in by_name:
                names.append(full)
        return names

    return sorted((by_name[name] for name in expand("")), key=lambda i: i.order)


def _is_pooling(info: LayerInfo) -> bool:
    """A global pooling: a ``*pool*`` module giving 1×1, or anything giving a (B, C) vector."""
    return info.layout == "NC" or ("pool" in info.type.lower() and info.grid is not None and set(info.grid) == {1})


def model_stages(model: nn.Module, example_input: Any) -> _Stages:
    """The stage ends of ``model`` for ``example_input``, and its repeated blocks when it has one resolution."""
    infos = list_layers(model, example_input)
    modules = named_modules(model)
    batch = batch_size(example_input)

    def runs_once_with_weights(info: LayerInfo) -> bool:
        return (info.calls == 1 and isinstance(info.shape, tuple) and bool(info.shape) and info.shape[0] == batch
                and any(True for _ in modules[info.name].parameters()))

    def is_feature(info: LayerInfo) -> bool:
        return (info.grid is not None and len(info.grid) == 2 and info.stride is not None
                and runs_once_with_weights(info))

    by_grid: dict[tuple, LayerInfo] = {}
    for info in _chain(model, infos):
        if _is_pooling(info):
            break
        if is_feature(info):
            by_grid[info.grid] = info  # the last to finish at each resolution
    stages = sorted(by_grid.values(), key=lambda i: (_stride(i), i.order))
    beyond_stem = [i for i in stages if _stride(i) >= _MIN_STRIDE]
    if len(beyond_stem) >= 3:
        stages = beyond_stem
    if not stages:  # a text transformer: token sequences without a grid, its blocks in one container
        sequences = [i for i in infos if i.layout == "NLC" and i.grid is not None and len(i.grid) == 1
                     and runs_once_with_weights(i)]
        blocks = _repeated_blocks(sequences, sequences[0].grid) if sequences else []
        return _Stages(blocks[-1:], blocks)
    blocks = _repeated_blocks([i for i in infos if is_feature(i)], stages[0].grid) if len(stages) == 1 else []
    return _Stages(stages, blocks)


def _repeated_blocks(spatial: Sequence[LayerInfo], grid: tuple) -> list[LayerInfo]:
    """The most direct children of one type that one container holds at ``grid`` (a ViT's encoder layers, a
    BERT's ``encoder.layer``; not its embeddings, a word, a position and a type embedding), the deepest such
    group on a tie."""
    groups: dict[tuple[str, str], list[LayerInfo]] = {}
    for info in spatial:
        parent, _, _ = info.name.rpartition(".")
        if info.grid == grid:
            groups.setdefault((parent, info.type), []).append(info)
    if not groups:
        return []
    best = max(groups.values(), key=lambda group: (len(group), max(i.order for i in group)))
    return sorted(best, key=lambda i: i.order) if len(best) > 1 else []


def _spread(blocks: Sequence[LayerInfo], count: int) -> list[LayerInfo]:
    """``count - 1`` blocks at depths j/count (j = 1..count-1): the first block to complete that share of the
    depth, ceil(j·L/count) (1-based)."""
    return [blocks[max(0, math.ceil(j * len(blocks) / count) - 1)] for j in range(1, count)]


def propose_pairs(teacher: nn.Module, student: nn.Module, example_input: Any) -> list[LayerPair]:
    """(teacher layer, student layer) pairs matched by resolution stage, as the module docstring describes."""
    t, s = model_stages(teacher, example_input), model_stages(student, example_input)
    if not t.stages or not s.stages:
        missing = "teacher" if not t.stages else "student"
        raise ValueError(f"the {missing} gives no feature map, token grid or token sequence before its pooling for "
                         "the example input; name the layers yourself (featkd layers lists them)")
    pairs: list[LayerPair] = []
    if len(t.stages) > 1 and len(s.stages) > 1:
        student_at = {info.grid: info for info in s.stages}
        for info in t.stages:
            if info.grid in student_at:
                pairs.append(LayerPair(info, student_at[info.grid], f"stride {info.stride}"))
    elif len(t.stages) > 1 or len(s.stages) > 1:  # one resolution against several: spread its blocks
        many, one = (t, s) if len(t.stages) > 1 else (s, t)
        spread = _spread(one.blocks, len(many.stages)) if one.blocks else []
        for stage, block in zip(many.stages, spread):
            index = one.blocks.index(block) + 1
            match = f"stride {stage.stride} <-> block {index} of {len(one.blocks)}"
            pairs.append(LayerPair(stage, block, match) if many is t else LayerPair(block, stage, match))
    else:
        count = min(len(t.blocks), len(s.blocks))  # every block of the shallower model (TinyBERT's uniform map)
        if count > 1:
            for t_block, s_block in zip(_spread(t.blocks, count), _spread(s.blocks, count)):
                pairs.append(LayerPair(t_block, s_block, f"block {t.blocks.index(t_block) + 1} of {len(t.blocks)} "
                                                         f"<-> {s.blocks.index(s_block) + 1} of {len(s.blocks)}"))
    last = (t.stages[-1], s.stages[-1])
    if pairs and (pairs[-1].teacher.name, pairs[-1].student.name) == (last[0].name, last[1].name):
        pairs[-1] = pairs[-1]._replace(match=pairs[-1].match + ", last feature")
    else:
        pairs.append(LayerPair(*last, "last feature"))
    return pairs


def pair_terms(pairs: Sequence[LayerPair], loss: str = "at", weight: float | None = None,
               options: dict | None = None) -> list[dict[str, Any]]:
    """The pairs as one ``terms:`` entry of a ``featkd distill`` config (:class:`featkd.config.TermConfig`):
    the teacher and student layer lists, ``loss``, ``weight`` (default: the loss's published weight,
    :func:`featkd.published.term_weight`) and ``options``."""
    if weight is None:
        from featkd.published import term_weight

        weight = term_weight(loss)
    term: dict[str, Any] = {"teacher": [p.teacher.name for p in pairs], "student": [p.student.name for p in pairs],
                            "loss": loss, "weight": float(weight)}
    if options:
        term["options"] = dict(options)
    return [term]
