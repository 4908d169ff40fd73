"""Feature layouts: which dimension of a captured feature holds the channels, and where its tokens are.

A backbone's features come in four layouts:

* ``"NCHW"`` — channels-first maps ``(B, C, H, W)`` (CNNs, torchvision's ConvNeXt stages);
* ``"NHWC"`` — channels-last maps ``(B, H, W, C)`` (torchvision's and timm's Swin stages, the inside of
  a ConvNeXt block);
* ``"NLC"``  — tokens ``(B, N, C)`` (ViT blocks), with ``prefix_tokens`` class / distillation / register
  tokens in front of an ``h × w`` grid of patch tokens;
* ``"NCL"``  — channels-first sequences ``(B, C, L)`` (1-d convolutions, flattened maps).

Every feature a :class:`featkd.Term` compares is first brought to one view, channels first:
:func:`to_channels_first` gives ``(B, C, H, W)`` whenever a grid is known (tokens: the patch tokens on
their grid, prefix tokens dropped) and ``(B, C, N)`` otherwise, so every loss keeps its own math.

A :class:`Layout` is resolved per feature by :func:`resolve_layout`: the one given (``student_layout=``
/ ``teacher_layout=``), else the one the model states (:mod:`featkd.models.stated_layouts`), else the only
reading the shape allows for the input size; a shape that reads more than one way is refused with the
readings to choose from, never guessed. A given layout that contradicts the one the model states (or, the
model stating none, every reading of the shape for the input size) is refused with both readings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["LAYOUT_KINDS", "TOKEN_SELECTIONS", "CapturedFeature", "Layout", "canonical_shape", "parse_layout",
           "mask_to_channels_first", "plausible_grid", "readings", "resolve_layout", "to_channels_first"]

LAYOUT_KINDS = ("NCHW", "NHWC", "NLC", "NCL")
_ALIASES = {"channels_first": None, "channels_last": "NHWC", "tokens": "NLC"}  # channels_first: NCHW or NCL by rank
_RANK = {"NCHW": 4, "NHWC": 4, "NLC": 3, "NCL": 3}
TOKEN_SELECTIONS = ("patch", "prefix", "all")
_MAX_PREFIX = 8  # class + distillation + register tokens a shape alone is searched for


@dataclasses.dataclass(frozen=True)
class Layout:
    """What each dimension of a feature means.

    ``kind``: one of :data:`LAYOUT_KINDS`. For tokens (``"NLC"``): ``prefix_tokens`` in front of the
    patch tokens and the patch ``grid`` ``(h, w)``; ``tokens`` picks what the losses see: ``"patch"``
    (default: the patch tokens on their grid, ``(B, C, h, w)``), ``"prefix"`` (only the prefix tokens,
    ``(B, C, k)``) or ``"all"`` (every token, ``(B, C, N)``). ``grid`` also turns a ``"NCL"`` sequence
    into a map. ``None`` leaves a field to the model or the shape. ``source`` says where the layout was
    learnt: ``"given"``, ``"model"`` or ``"shape"``.
    """

    kind: str
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    tokens: str = "patch"
    source: str = dataclasses.field(default="given", compare=False)

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(_unknown_layout(self.kind))
        if self.tokens not in TOKEN_SELECTIONS:
            raise ValueError(f"unknown token selection {self.tokens!r}; choose one of {', '.join(TOKEN_SELECTIONS)} "
                             "(patch: the patch tokens on their grid, prefix: only the class/register tokens, all)")
        if self.prefix_tokens is not None and (not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 0):
            raise ValueError(f"prefix_tokens must be a count >= 0, got {self.prefix_tokens!r}")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
                raise ValueError(f"a layout's grid is (height, width) in tokens, got {self.grid!r}")
            object.__setattr__(self, "grid", grid)
        if self.kind not in ("NLC",) and (self.prefix_tokens or self.tokens != "patch"):
            raise ValueError(f"prefix tokens and token selection apply to tokens ('NLC'), not to {self.kind!r}")

    def describe(self) -> str:
        """``NLC+1 14x14`` style: the kind, then prefix tokens and grid where they apply."""
        text = self.kind
        if self.prefix_tokens:
            text += f"+{self.prefix_tokens}"
        if self.grid is not None and self.kind in ("NLC", "NCL"):
            text += f" {self.grid[0]}x{self.grid[1]}"
        if self.tokens != "patch":
            text += f" ({self.tokens} tokens)"
        return text


def _unknown_layout(value) -> str:
    return (f"unknown layout {value!r}; choose one of 'NCHW' (B, C, H, W), 'NHWC' (B, H, W, C), 'NLC' (B, N, C) "
            "tokens, 'NCL' (B, C, L) (aliases: channels_first, channels_last, tokens)")


def parse_layout(value: Any, rank: int | None = None) -> Layout | None:
    """A :class:`Layout` from what a user wrote: ``None``, a name (``"NHWC"``, ``"tokens"``, ``"channels_first"``,
    case-insensitive), a mapping ``{kind, prefix_tokens, grid, tokens}`` or a Layout. ``channels_first``
    means ``NCHW`` for a 4-d feature and ``NCL`` for a 3-d one (``rank``)."""
    if value is None or isinstance(value, Layout):
        return value
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(Layout)} - {"source"}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown layout key(s) {unknown}; a layout mapping takes {', '.join(sorted(fields))}")
        options = dict(value)
        kind = parse_layout(options.pop("kind", None), rank)
        if kind is None:
            raise ValueError("a layout mapping needs kind: one of " + ", ".join(LAYOUT_KINDS))
        if options.get("grid") is not None:
            options["grid"] = tuple(options["grid"])
        return Layout(kind.kind, **options)
    if not isinstance(value, str):
        raise ValueError(_unknown_layout(value))
    name = value.strip()
    if name.lower() in _ALIASES:
        kind = _ALIASES[name.lower()] or ("NCL" if rank == 3 else "NCHW")
    elif name.upper() in LAYOUT_KINDS:
        kind = name.upper()
    else:
        raise ValueError(_unknown_layout(value))
    return Layout(kind)


# --------------------------------------------------------------------------- the channels-first view


def _check_rank(shape: Sequence[int], layout: Layout) -> None:
    if len(shape) != _RANK[layout.kind]:
        expected = {"NCHW": "(B, C, H, W)", "NHWC": "(B, H, W, C)", "NLC": "(B, N, C)", "NCL": "(B, C, L)"}
        other = [k for k, r in _RANK.items() if r == len(shape)]
        hint = f"; a {len(shape)}-d feature is one of {', '.join(other)}" if other else ""
        raise ValueError(f"layout {layout.kind!r} expects {expected[layout.kind]}, got a feature of shape "
                         f"{tuple(shape)}{hint}")


def canonical_shape(shape: Sequence[int], layout: Layout) -> tuple[int, ...]:
    """The shape :func:`to_channels_first` gives a feature of ``shape``."""
    shape = tuple(int(s) for s in shape)
    _check_rank(shape, layout)
    if layout.kind == "NCHW":
        return shape
    if layout.kind == "NHWC":
        return (shape[0], shape[3], shape[1], shape[2])
    if layout.kind == "NCL":
        if layout.grid is not None:
            _check_grid(shape[2], layout)
            return (shape[0], shape[1], *layout.grid)
        return shape
    batch, tokens, channels = shape
    prefix = layout.prefix_tokens or 0
    if prefix >= tokens and layout.tokens != "all":
        raise ValueError(f"tokens of shape {shape}: {prefix} prefix tokens leave no patch tokens")
    if layout.tokens == "all":
        return (batch, channels, tokens)
    if layout.tokens == "prefix":
        return (batch, channels, prefix)
    if layout.grid is not None:
        _check_grid(tokens - prefix, layout)
        return (batch, channels, *layout.grid)
    return (batch, channels, tokens - prefix)


def _check_grid(cells: int, layout: Layout) -> None:
    h, w = layout.grid
    if h * w != cells:
        raise ValueError(f"layout {layout.describe()}: a {h}x{w} grid holds {h * w} tokens, the feature has {cells}")


def to_channels_first(f: Tensor, layout: Layout | str) -> Tensor:
    """``f`` as channels-first ``(B, C, H, W)`` (a grid known) or ``(B, C, N)``: a view, copied only by the
    reshape of tokens onto their grid.

    >>> to_channels_first(swin_stage, "NHWC").shape      # (B, H, W, C) -> (B, C, H, W)
    >>> to_channels_first(vit_tokens, Layout("NLC", prefix_tokens=1, grid=(14, 14))).shape   # (B, 768, 14, 14)
    """
    layout = parse_layout(layout, f.dim())
    shape = canonical_shape(f.shape, layout)
    if layout.kind == "NCHW":
        return f
    if layout.kind == "NHWC":
        return f.permute(0, 3, 1, 2)
    if layout.kind == "NCL":
        return f.reshape(shape)
    prefix = layout.prefix_tokens or 0
    if layout.tokens == "prefix":
        f = f[:, :prefix]
    elif layout.tokens == "patch":
        f = f[:, prefix:]
    return f.transpose(1, 2).reshape(shape)


def mask_to_channels_first(mask: Tensor, layout: Layout | str) -> Tensor:
    """A token mask over a feature's own positions as the (B, N) mask of its :func:`to_channels_first` view,
    the positions a masked loss (:mod:`featkd.functional._masks`) sees.

    ``"NLC"``: ``mask`` is (B, L) over the whole token sequence, prefix tokens included (a language
    model's attention mask, CLS counted as a token); the layout's token selection applies as to the
    feature: ``"patch"`` drops the prefix tokens (a grid's h·w patches remain, row by row),
    ``"prefix"`` keeps only them, ``"all"`` keeps every token, so a plain sequence without prefix tokens
    or grid keeps its mask as it is. ``"NCL"``: (B, L) as it is; ``"NCHW"``/``"NHWC"``: (B, H, W) or
    (B, H·W), flattened row by row.
    """
    layout = parse_layout(layout, mask.dim() + 1)
    if layout.kind == "NLC":
        prefix = layout.prefix_tokens or 0
        if layout.tokens == "prefix":
            mask = mask[:, :prefix]
        elif layout.tokens == "patch":
            mask = mask[:, prefix:]
    return mask.flatten(1)


# --------------------------------------------------------------------------- readings of a shape


def plausible_grid(grid: Sequence[int], input_size: Sequence[int]) -> bool:
    """Whether one stride ``s`` for both axes (a convolution, pooling or patch embedding with the same kernel
    and padding along both) could turn an input of ``input_size`` (H, W) into a ``grid`` (h, w): each axis
    rounds its size by less than a cell, ``|h - H/s| < 1`` and ``|w - W/s| < 1``, and both round alike,
    ``|(h - w) - (H - W)/s| < 1`` (so a square input gives a square grid)."""
    (h, w), (height, width) = grid, input_size
    if h < 1 or w < 1:
        return False
    # each condition bounds t = 1/s to an open interval; the grid is plausible when they overlap
    low, high = max(0.0, (h - 1) / height, (w - 1) / width), min((h + 1) / height, (w + 1) / width)
    d, span = h - w, height - width
    if span == 0:
        return abs(d) < 1 and low < high
    bounds = sorted(((d - 1) / span, (d + 1) / span))
    return max(low, bounds[0]) < min(high, bounds[1])


def _token_readings(tokens: int, input_size: Sequence[int]) -> list[Layout]:
    found = []
    for prefix in range(0, min(tokens, _MAX_PREFIX + 1)):
        cells = tokens - prefix
        grids = [(h, cells // h) for h in range(1, cells + 1) if cells % h == 0]
        found += [Layout("NLC", prefix, g, source="shape") for g in grids if plausible_grid(g, input_size)]
    return found


def readings(shape: Sequence[int], input_size: Sequence[int] | None) -> list[Layout]:
    """Every layout a feature of ``shape`` could have, read from its shape and the input's spatial size
    (``None``: not an image, every rank-compatible kind stays possible). 4-d: ``NCHW`` and ``NHWC`` whose
    grid the input could give; 3-d: tokens with 0..8 prefix tokens and ``NCL``, on a grid for 2-d inputs."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        if input_size is None or len(input_size) != 2:
            return [Layout("NCHW", source="shape"), Layout("NHWC", source="shape")]
        found = []
        if plausible_grid(shape[2:], input_size):
            found.append(Layout("NCHW", source="shape"))
        if plausible_grid(shape[1:3], input_size):
            found.append(Layout("NHWC", source="shape"))
        return found
    if len(shape) == 3:
        if input_size is None or len(input_size) != 2:
            return [Layout("NLC", source="shape"), Layout("NCL", source="shape")]
        found = _token_readings(shape[1], input_size)
        flat = [(h, shape[2] // h) for h in range(1, shape[2] + 1) if shape[2] % h == 0]
        return found + [Layout("NCL", grid=g, source="shape") for g in flat if plausible_grid(g, input_size)]
    return []


def _describe_reading(shape: Sequence[int], layout: Layout) -> str:
    spec = layout.kind if not layout.prefix_tokens else f"{{kind: NLC, prefix_tokens: {layout.prefix_tokens}}}"
    return f"{spec} ({_reading(shape, layout)})"


def _reading(shape: Sequence[int], layout: Layout) -> str:
    """What ``layout`` makes of ``shape``: ``16 channels on a 28x28 grid``."""
    canon = canonical_shape(shape, layout)
    where = f"on a {'x'.join(map(str, canon[2:]))} grid" if len(canon) == 4 else f"at {canon[2]} positions"
    prefix = f", {layout.prefix_tokens} prefix token(s)" if layout.prefix_tokens else ""
    return f"{canon[1]} channels {where}{prefix}"


def _as_given(layout: Layout) -> str:
    """A given layout as the user wrote it: ``NHWC``, ``{kind: NLC, prefix_tokens: 1, grid: [2, 8]}``."""
    parts = [f"prefix_tokens: {layout.prefix_tokens}"] if layout.prefix_tokens is not None else []
    parts += [f"grid: [{layout.grid[0]}, {layout.grid[1]}]"] if layout.grid is not None else []
    parts += [f"tokens: {layout.tokens}"] if layout.tokens != "patch" else []
    return f"{{kind: {layout.kind}, {', '.join(parts)}}}" if parts else layout.kind


# --------------------------------------------------------------------------- resolution


@dataclasses.dataclass(frozen=True)
class CapturedFeature:
    """What a dry run knows about one captured feature: its ``shape``, the layout the model states
    (``known``, ``None`` when it does not) and the example input's spatial size (``None``: not an image)."""

    shape: tuple[int, ...]
    known: Layout | None = None
    input_size: tuple[int, ...] | None = None


def resolve_layout(given: Any, feature: CapturedFeature, what: str, option: str = "layout") -> Layout | None:
    """The layout of ``feature``: ``given`` (a :func:`parse_layout` value), completed from what the model
    states or the shape allows; else the model's; else the one reading of the shape. ``what`` names the
    feature in errors (``"student layer 'layer3'"``) and ``option`` the argument that would settle it.

    Raises ValueError when ``given`` does not fit the shape, contradicts the layout the model states or (the
    model stating none) every reading of the shape for the input size, or when nothing settles the layout:
    the message names the readings.
    """
    shape = tuple(feature.shape)
    given = parse_layout(given, len(shape))
    layout = _resolve(given, feature, what, option)
    if given is not None and layout is not None:
        _check_given(given, layout, feature, what, option)
    return layout


def _resolve(given: Layout | None, feature: CapturedFeature, what: str, option: str) -> Layout | None:
    """:func:`resolve_layout` before a given layout is checked against the model and the shape's readings."""
    shape = tuple(feature.shape)
    if len(shape) not in (3, 4):
        if given is not None:
            raise ValueError(f"{what} gives a feature of shape {shape}; a layout applies to 3-d and 4-d features")
        return None
    known = feature.known
    base = given if given is not None else known
    if base is None:
        choices = readings(shape, feature.input_size)
        return choices[0] if len(choices) == 1 else _ambiguous(shape, choices, what, option, feature.input_size)
    try:
        _check_rank(shape, base)
    except ValueError as error:
        raise ValueError(f"{what}: {error}; set {option} to its layout") from None
    if base.kind in ("NCHW", "NHWC") or base.grid is not None:
        return _fits(shape, base, what, option)

    # tokens or a sequence without a grid: the prefix count and grid the model or the shape gives
    def matching(layouts):
        return [c for c in layouts if c is not None and c.kind == base.kind and c.grid is not None
                and (base.prefix_tokens is None or c.prefix_tokens == base.prefix_tokens)]

    candidates = matching([known] if given is not None else []) or matching(readings(shape, feature.input_size))
    if len(candidates) > 1:
        return _ambiguous(shape, candidates, what, option, feature.input_size,
                          "whose prefix tokens and grid read more than one way")
    filled = candidates[0] if candidates else None
    prefix = base.prefix_tokens if base.prefix_tokens is not None else (filled.prefix_tokens if filled else None)
    if prefix is None and base.kind == "NLC" and base.tokens != "all":
        raise ValueError(f"{what} gives tokens of shape {shape} whose prefix tokens (class, distillation, register) "
                         f"neither the model nor the shape tells; set {option} to {{kind: NLC, prefix_tokens: k}}")
    grid = filled.grid if filled else None
    return _fits(shape, Layout(base.kind, prefix or 0, grid, base.tokens, source=base.source), what, option)


def _check_given(given: Layout, layout: Layout, feature: CapturedFeature, what: str, option: str) -> None:
    """Refuse a given layout that contradicts the one the model states or, when it states none, every reading
    of the shape for the input size: trained anyway, a loss would compare the wrong dimensions."""
    shape, known, size = tuple(feature.shape), feature.known, feature.input_size
    if known is not None:
        if _agrees(given, known):
            return
        against = f"the model states {_describe_reading(shape, known)}"
        both = "" if option == "layout" else " (and layout, which sets both sides)"
        fix = f"leave {option}{both} unset to use the model's layout"
    else:
        choices = readings(shape, size) if size is not None and len(size) == 2 else []
        if not choices or any(_agrees(given, choice) for choice in choices):
            return
        listed = " or ".join(_describe_reading(shape, choice) for choice in choices)
        against = f"with a {size[0]}x{size[1]} input the shape reads only as {listed}"
        fix = f"set {option} to {'that' if len(choices) == 1 else 'the right one'}"
    raise ValueError(f"{what}: {option} {_as_given(given)} given, which reads the shape {shape} as "
                     f"{_reading(shape, layout)}, but {against}; {fix}")


def _agrees(given: Layout, stated: Layout) -> bool:
    """Whether what ``given`` says (its kind, and its prefix tokens and grid where it gives them) is what
    ``stated`` says where it says it."""
    return given.kind == stated.kind and all(
        mine is None or theirs is None or mine == theirs
        for mine, theirs in ((given.prefix_tokens, stated.prefix_tokens), (given.grid, stated.grid)))


def _fits(shape, layout: Layout, what: str, option: str) -> Layout:
    try:
        canonical_shape(shape, layout)
    except ValueError as error:
        raise ValueError(f"{what}: {error}; set {option} to its layout") from None
    return layout


def _ambiguous(shape, choices: list[Layout], what: str, option: str, input_size,
               unknown: str = "whose layout the model does not state and whose shape reads more than one way"
               ) -> Layout:
    where = f" for a {'x'.join(map(str, input_size))} input" if input_size else ""
    if not choices:
        raise ValueError(f"{what} gives a feature of shape {shape} that no layout reads as a grid{where}; set "
                         f"{option} to one of {', '.join(LAYOUT_KINDS[:2] if len(shape) == 4 else LAYOUT_KINDS[2:])}")
    listed = " or ".join(_describe_reading(shape, c) for c in choices)
    raise ValueError(f"{what} gives a feature of shape {shape} {unknown}{where}: {listed}; set {option} to the "
                     "right one")
