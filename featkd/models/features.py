"""Feature metadata shared by every featkd model (timm-style ``feature_info``)."""

from __future__ import annotations

from typing import NamedTuple


class FeatureInfo(NamedTuple):
    """One distillable feature map: module path, channel count and spatial reduction from the input.

    ``reduction`` is the stride of the map relative to the input (1 = same size, 4 = a quarter per side);
    for inputs whose size is not a multiple of it the map has ``ceil(size / reduction)`` pixels per side.
    """

    name: str
    channels: int
    reduction: int
