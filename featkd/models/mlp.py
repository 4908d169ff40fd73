"""A ReLU MLP on flattened images, as in Hinton et al.'s (2015) MNIST experiments (``create_model("mlp")``).

``hidden`` lists the hidden widths (Hinton et al.: 2×1200 teacher with dropout, 2×800 student). The
last layer is an ``nn.Linear`` whose bias the omitted-class experiment shifts. It has no feature
metadata: it is trained with logits only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from featkd.models.catalog import register_model


@register_model("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: Sequence[int] = (800, 800),
        dropout: float = 0.0) -> nn.Sequential:
    """A ReLU MLP on flattened ``in_channels``×``image_size``×``image_size`` images."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
