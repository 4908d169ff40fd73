"""CIFAR ResNets of He et al. 2016 (section 4.2): ResNet-20/32/44/56/110.

A 3×3 stem with 16 channels, three stages of n = (depth - 2) / 6 post-activation basic blocks with
16, 32, 64 channels (strides 1, 2, 2), global average pooling and a linear classifier.
The default shortcut is the paper's **option A** for CIFAR: identity, with stride-2 subsampling and
zero-padded extra channels where the shape changes (no parameters; ResNet-20 has 0.27M parameters).
``shortcut="B"`` uses a 1×1 convolution + BN projection where the shape changes instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featkd.models.features import FeatureInfo
from featkd.models.catalog import register_family


class ZeroPadShortcut(nn.Module):
    """Option A: take every ``stride``-th pixel and append zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, add the shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` (depth = 6n + 2) for ``in_channels``-channel images of any size ≥ 8."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                             f"got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding identity) or 'B' (1x1 projection), got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1, shortcut)
        self.layer2 = self._stage(16, 32, n, 2, shortcut)
        self.layer3 = self._stage(32, 64, n, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.output_fmt = "NCHW"  # every feature map is channels-first (timm's name for it)
        self.feature_info = [FeatureInfo("layer1", 16, 1), FeatureInfo("layer2", 32, 2), FeatureInfo("layer3", 64, 4)]
        self.default_distill_layers = [f.name for f in self.feature_info]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        return nn.Sequential(*[
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, shortcut)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# resnet{depth}: any depth 6n+2; these are the ones listed
register_family(r"^resnet(\d+)$", lambda m, **kw: CifarResNet(int(m[1]), **kw),
                [f"resnet{d}" for d in (20, 32, 44, 56, 110)], fixed=("depth",))
