"""Network in Network (Lin, Chen & Yan 2014), CIFAR variant with batch normalisation.

Three mlpconv blocks — a spatial conv followed by two 1×1 convs, each conv + BN + ReLU:
``block1`` 5×5 → (192, 160, 96) channels then 3×3/2 max-pool and dropout; ``block2`` 5×5 → (192, 192, 192)
then 3×3/2 average pool and dropout; ``block3`` 3×3 → (192, 192). The ``classifier`` is the paper's last
1×1 conv to ``num_classes`` maps followed by global average pooling (no fully connected layer).

``width`` scales every hidden channel count. The Attention Transfer paper's CIFAR-10 pair is
NIN-wide (≈1M parameters) teacher and NIN-thin (≈0.2M) student; featkd's ``nin`` is ``width=1``
(0.97M, the paper's network) and ``nin_thin`` is ``width=0.45`` (0.20M). The three distillable maps
are the block outputs (after the pools), at strides 2, 4, 4; the last map after its BN and before its
ReLU is ``block3.4`` (``pre_relu_layer``).
"""

from __future__ import annotations

import torch
from torch import nn

from featkd.models.features import FeatureInfo
from featkd.models.catalog import register_model


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU()]


def _mlpconv(in_channels: int, channels: tuple[int, int, int], kernel: int) -> list[nn.Module]:
    a, b, c = channels
    return _conv_bn_relu(in_channels, a, kernel) + _conv_bn_relu(a, b, 1) + _conv_bn_relu(b, c, 1)


class NIN(nn.Module):
    """Network in Network with hidden widths scaled by ``width``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        if width <= 0:
            raise ValueError(f"NIN width multiplier must be positive, got {width}")
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731 - a one-line scaling rule
        self.width = width
        self.block1 = nn.Sequential(*_mlpconv(in_channels, (c(192), c(160), c(96)), 5),
                                    nn.MaxPool2d(3, stride=2, padding=1), nn.Dropout(dropout))
        self.block2 = nn.Sequential(*_mlpconv(c(96), (c(192), c(192), c(192)), 5),
                                    nn.AvgPool2d(3, stride=2, padding=1), nn.Dropout(dropout))
        self.block3 = nn.Sequential(*_conv_bn_relu(c(192), c(192), 3), *_conv_bn_relu(c(192), c(192), 1))
        self.classifier = nn.Sequential(nn.Conv2d(c(192), num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.output_fmt = "NCHW"  # every feature map is channels-first (timm's name for it)
        self.feature_info = [FeatureInfo("block1", c(96), 2), FeatureInfo("block2", c(192), 4),
                             FeatureInfo("block3", c(192), 4)]
        self.default_distill_layers = [f.name for f in self.feature_info]
        self.pre_relu_layer = "block3.4"  # block3's last BN: conv, BN, ReLU, conv, BN (index 4), ReLU
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block3(self.block2(self.block1(x))))


register_model("nin", lambda **kw: NIN(width=kw.pop("width", 1.0), **kw))
register_model("nin_thin", lambda **kw: NIN(width=kw.pop("width", 0.45), **kw))
