"""Hidden-state regression: FitNets hints, a learnable regressor then MSE (:func:`featkd.functional.hint_loss`),
and DistilBERT's cosine loss (:func:`featkd.functional.cosine_loss`)."""

from __future__ import annotations

from torch import Tensor, nn

from featkd import functional as KF
from featkd.functional.shapes import channels
from featkd.losses.registry import BatchContext, Shape, check_positions, context_mask, register_feature_loss


@register_feature_loss("hint", needs_shapes=True, uses_context=True)
class HintLoss(nn.Module):
    """FitNets hint: a learnable regressor maps the student feature to the teacher's channels, then MSE.

    The regressor (a ``kernel_size`` conv for maps, a linear layer per position for (B, C, N) sequences,
    plus BatchNorm when ``batch_norm``) is built when the channel counts differ, or always with
    ``regressor=True``. Features arrive channels first at equal positions: layouts and resizing are the
    :class:`featkd.Term`'s (its automatic adapter resizes a student map to the teacher's).

    With a token mask in the batch's context (``BatchContext.attention_mask``) the squared error is
    averaged per sample over its valid tokens; the regressor must then act on each position alone
    (no BatchNorm, whose statistics would include the padding, and ``kernel_size=1``).
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, kernel_size: int = 1, *,
                 batch_norm: bool = False, regressor: bool | None = None):
        super().__init__()
        self.check_shapes(student_shape, teacher_shape)
        c_s, c_t = student_shape[1], teacher_shape[1]
        self.teacher_shape = tuple(teacher_shape)
        self.regressor = None
        self.mixes_positions = None  # why the regressor mixes positions, which a token mask cannot allow
        if regressor or (regressor is None and c_s != c_t):
            if len(student_shape) == 4:
                if kernel_size % 2 != 1:
                    raise ValueError(f"HintLoss kernel_size must be odd to keep the spatial size, got {kernel_size}")
                layers = [nn.Conv2d(c_s, c_t, kernel_size, padding=kernel_size // 2, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(c_t)] if batch_norm else []
            else:
                if kernel_size != 1:
                    raise ValueError(f"HintLoss on flattened maps or tokens takes kernel_size=1, got {kernel_size}")
                layers = [_ChannelLinear(c_s, c_t, bias=not batch_norm)]
                layers += [nn.BatchNorm1d(c_t)] if batch_norm else []
            self.regressor = nn.Sequential(*layers)
            if batch_norm or kernel_size != 1:
                self.mixes_positions = f"batch_norm={batch_norm}, kernel_size={kernel_size}"

    @staticmethod
    def check_shapes(student_shape: Shape, teacher_shape: Shape) -> None:
        if len(student_shape) != len(teacher_shape):
            raise ValueError(f"hint: student {tuple(student_shape)} and teacher {tuple(teacher_shape)} differ in rank")
        check_positions("hint", student_shape, teacher_shape)

    def forward(self, f_s: Tensor, f_t: Tensor, context: BatchContext | None = None) -> Tensor:
        mask = context_mask(context)
        if mask is not None and self.mixes_positions:
            raise ValueError(f"hint with a token mask needs a regressor that acts on each position alone "
                             f"(kernel_size=1, batch_norm=False), this one has {self.mixes_positions}: padding "
                             "would reach valid tokens")
        if self.regressor is not None:
            f_s = self.regressor(f_s)
        return KF.hint_loss(f_s, f_t, mask=mask)


@register_feature_loss("cosine", uses_context=True)
class CosineLoss(nn.Module):
    """DistilBERT's hidden-state loss, 1 - cos per position (see :func:`featkd.functional.cosine_loss`); leaves
    padded tokens out when the batch's context has a token mask (``BatchContext.attention_mask``).

    Student and teacher need equal channels-first shapes (the Distiller's automatic adapter projects the
    student's channels to the teacher's otherwise)."""

    def __init__(self, *, eps=1e-8):
        super().__init__()
        self.eps = eps

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        if tuple(student_shape) != tuple(teacher_shape):
            raise ValueError(f"cosine compares the vectors at each position, so the shapes must be equal: student "
                             f"{tuple(student_shape)}, teacher {tuple(teacher_shape)}")
        channels(student_shape, "channels_first", "student")  # a shape with channels

    def forward(self, f_s: Tensor, f_t: Tensor, context: BatchContext | None = None) -> Tensor:
        return KF.cosine_loss(f_s, f_t, mask=context_mask(context), eps=self.eps)


class _ChannelLinear(nn.Linear):
    """Linear map of the channel dimension of (B, C, N) sequences, each position alone."""

    def forward(self, f):
        return super().forward(f.transpose(1, 2)).transpose(1, 2)
