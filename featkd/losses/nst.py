"""Neuron Selectivity Transfer's module (see :func:`featkd.functional.nst_loss`)."""

from __future__ import annotations

from torch import Tensor, nn

from featkd import functional as KF
from featkd.functional.shapes import check_choice, unknown_name_error
from featkd.functional.nst import ROUTES
from featkd.losses.registry import BatchContext, Shape, check_positions, context_mask, register_feature_loss


@register_feature_loss("nst", uses_context=True)
class NSTLoss(nn.Module):
    """Neuron Selectivity Transfer: kernel MMD between channels (see :func:`featkd.functional.nst_loss`).

    Leaves padded tokens out when the batch's context has a token mask (``BatchContext.attention_mask``).
    Features arrive channels first at equal positions: layouts and resizing are the :class:`featkd.Term`'s.
    """

    def __init__(self, kernel="poly", *, route="auto", **kernel_options):
        super().__init__()
        if kernel not in KF.KERNELS:
            raise unknown_name_error("NST kernel", kernel, sorted(KF.KERNELS))
        spec = KF.KERNELS[kernel]
        for key in kernel_options:
            if key not in spec.defaults:
                known = sorted(set(spec.defaults) | {"route"})
                raise unknown_name_error(f"NST kernel {kernel!r} option", key, known)
        spec.resolve(kernel_options)  # invalid parameters are refused when the loss is built
        check_choice("NST route", route, ROUTES)
        self.kernel = kernel
        self.options = dict(route=route, **kernel_options)

    def check_shapes(self, student_shape: Shape, teacher_shape: Shape) -> None:
        check_positions("nst", student_shape, teacher_shape)

    def forward(self, f_s: Tensor, f_t: Tensor, context: BatchContext | None = None) -> Tensor:
        return KF.nst_loss(f_s, f_t, self.kernel, mask=context_mask(context), **self.options)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
