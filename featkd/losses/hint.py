"""FitNets hints: a learnable regressor, then MSE (see :func:`featkd.functional.hint_loss`)."""

from __future__ import annotations

from torch import Tensor, nn

from featkd import functional as KF
from featkd.functional.shapes import channels, check_spatial
from featkd.losses.registry import Shape, register_feature_loss


@register_feature_loss("hint", needs_shapes=True)
class HintLoss(nn.Module):
    """FitNets hint: a learnable regressor maps the student feature to the teacher's shape, then MSE.

    The regressor (a ``kernel_size`` conv for maps, a linear layer for (B, C, N) or tokens, plus
    BatchNorm when ``batch_norm``) is built when the channel counts differ, or always with
    ``regressor=True``. Different spatial sizes need ``resize`` ("pool" or "interpolate"),
    applied to the regressed student.
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, kernel_size: int = 1, *,
                 batch_norm: bool = False, regressor: bool | None = None, resize=None,
                 layout: str = "channels_first"):
        super().__init__()
        self.check_shapes(student_shape, teacher_shape, resize, layout)
        c_s, c_t = channels(student_shape, layout, "student"), channels(teacher_shape, layout, "teacher")
        self.teacher_shape, self.resize, self.layout = tuple(teacher_shape), resize, layout
        self.regressor = None
        if regressor or (regressor is None and c_s != c_t):
            if len(student_shape) == 4 and layout == "channels_first":
                if kernel_size % 2 != 1:
                    raise ValueError(f"HintLoss kernel_size must be odd to keep the spatial size, got {kernel_size}")
                layers = [nn.Conv2d(c_s, c_t, kernel_size, padding=kernel_size // 2, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(c_t)] if batch_norm else []
            else:
                if kernel_size != 1:
                    raise ValueError(f"HintLoss on flattened maps or tokens takes kernel_size=1, got {kernel_size}")
                layers = [_ChannelLinear(c_s, c_t, layout, bias=not batch_norm)]
                layers += [_ChannelBatchNorm(c_t, layout)] if batch_norm else []
            self.regressor = nn.Sequential(*layers)

    @staticmethod
    def check_shapes(student_shape: Shape, teacher_shape: Shape, resize=None, layout="channels_first") -> None:
        if len(student_shape) != len(teacher_shape):
            raise ValueError(f"hint: student {tuple(student_shape)} and teacher {tuple(teacher_shape)} differ in rank")
        check_spatial(student_shape, teacher_shape, resize, layout)
        if resize == "pool" and any(s < t for s, t in zip(student_shape[2:], teacher_shape[2:])):
            raise ValueError(
                f"hint resize='pool' shrinks the student to the teacher's size, but student {tuple(student_shape)} is "
                f"smaller than teacher {tuple(teacher_shape)}; use resize='interpolate'"
            )

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        if self.regressor is not None:
            f_s = self.regressor(f_s)
        if f_s.dim() == 4 and f_s.shape[2:] != f_t.shape[2:]:
            if self.resize == "pool":
                f_s = nn.functional.adaptive_avg_pool2d(f_s, f_t.shape[2:])
            else:
                f_s = nn.functional.interpolate(f_s, size=f_t.shape[2:], mode="bilinear", align_corners=False)
        return KF.hint_loss(f_s, f_t)


class _ChannelLinear(nn.Linear):
    """Linear map of the channel dimension of (B, C, N) maps or (B, N, C) tokens."""

    def __init__(self, c_in, c_out, layout, bias=True):
        super().__init__(c_in, c_out, bias=bias)
        self.layout = layout

    def forward(self, f):
        return super().forward(f) if self.layout == "tokens" else super().forward(f.transpose(1, 2)).transpose(1, 2)


class _ChannelBatchNorm(nn.BatchNorm1d):
    def __init__(self, c, layout):
        super().__init__(c)
        self.layout = layout

    def forward(self, f):
        return super().forward(f) if self.layout != "tokens" else super().forward(f.transpose(1, 2)).transpose(1, 2)
