"""Wide Residual Networks (Zagoruyko & Komodakis 2016) as in the Attention Transfer code.

WRN-d-k: a 3×3 stem conv with 16 channels, three groups of n = (d - 4) / 6 pre-activation basic
blocks with widths 16k, 32k, 64k (strides 1, 2, 2), a final BN-ReLU, global average pooling and a
linear classifier. Convolutions have no bias. A block whose input and output widths differ gets a
1×1 projection shortcut applied to the *pre-activated* input (the official code's ``convdim``);
otherwise the shortcut is the identity. Dropout (the WRN paper's option) sits between the two
convolutions of a block. AT transfers the outputs of ``group1``, ``group2`` and ``group3``; the last
feature map after its BN and before its ReLU — where the official NST code applies its loss — is the
output of the final ``bn`` (``pre_relu_layer``).

Initialisation: He-normal convolutions and classifier weights, zero biases, and BN weights set by
``bn_init``: ``"ones"`` (featkd's default, PyTorch's) or ``"uniform"`` — uniform on [0, 1), the official
AT code's ``torch.rand(n)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featkd.models.features import FeatureInfo
from featkd.models.catalog import register_family


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if in_channels != out_channels or stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No in-place ops: a hook on any submodule must see the value it produced.
        o1 = F.relu(self.bn1(x))
        y = self.conv1(o1)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o1))


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for ``in_channels``-channel images of any size ≥ 8 (adaptive pooling)."""

    def __init__(self, depth: int = 16, width: int = 1, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, bn_init: str = "ones"):
        super().__init__()
        if bn_init not in BN_INITS:
            raise ValueError(f"WRN bn_init must be one of {sorted(BN_INITS)}, got {bn_init!r}")
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width multiplier must be a positive integer, got {width}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.group1 = self._group(16, widths[0], n, 1, dropout)
        self.group2 = self._group(widths[0], widths[1], n, 2, dropout)
        self.group3 = self._group(widths[1], widths[2], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self.output_fmt = "NCHW"  # every feature map is channels-first (timm's name for it)
        self.feature_info = [
            FeatureInfo("group1", widths[0], 1),
            FeatureInfo("group2", widths[1], 2),
            FeatureInfo("group3", widths[2], 4),
        ]
        self.default_distill_layers = [f.name for f in self.feature_info]
        self.pre_relu_layer = "bn"  # its output is the BN-normalised last map, before forward's final ReLU
        _init_weights(self, BN_INITS[bn_init])

    @staticmethod
    def _group(in_channels: int, out_channels: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(*[
            PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, dropout)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


BN_INITS = {"ones": nn.init.ones_, "uniform": nn.init.uniform_}  # uniform_: U[0, 1), as torch.rand


def _init_weights(model: nn.Module, bn_weight_init) -> None:
    """He-normal convolutions and classifier, zero biases, BN weights by ``bn_weight_init``."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            bn_weight_init(m.weight)
            nn.init.zeros_(m.bias)


# wrn{depth}_{width} (also wrn-16-1, WRN-40-2): any valid depth and width; these are the ones listed
register_family(r"^wrn[-_]?(\d+)[-_](\d+)$", lambda m, **kw: WideResNet(int(m[1]), int(m[2]), **kw),
                [f"wrn{d}_{k}" for d, k in [(10, 1), (16, 1), (16, 2), (16, 4), (16, 8), (22, 8), (28, 10), (40, 1),
                                            (40, 2), (40, 4)]], fixed=("depth", "width"))
