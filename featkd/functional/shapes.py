"""Shared input handling for the feature losses: layouts, spatial matching, float32 compute, option checks.

Every feature loss accepts maps ``(B, C, H, W)``, flattened maps ``(B, C, N)``
(``layout="channels_first"``, the default) or transformer tokens ``(B, N, C)``
(``layout="tokens"``) and works internally on ``(B, C, N)``. The pure functions in
:mod:`featkd.functional` and the loss modules in :mod:`featkd.losses` (which check shapes and options
before any forward) use these helpers; a loss of your own may too.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LAYOUTS", "RESIZE_MODES", "channels", "check_choice", "check_spatial", "full_precision", "resize_pair",
           "to_bcn", "unknown_name_error"]

LAYOUTS = ("channels_first", "tokens")
RESIZE_MODES = (None, "pool", "interpolate")


def unknown_name_error(kind: str, name, known: Sequence[str]) -> ValueError:
    """A ValueError for an unknown ``name`` that lists the close matches and every known name."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known if k is not None], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(repr(k) for k in known)}.")


def check_choice(kind: str, value, choices: Sequence) -> None:
    """Raise :func:`unknown_name_error` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise unknown_name_error(kind, value, choices)


def _layout_dims(shape: Sequence[int], layout: str, role: str) -> tuple[int, int, tuple[int, ...]]:
    """(batch, channels, spatial dims) of a feature shape."""
    check_choice("layout", layout, LAYOUTS)
    shape = tuple(int(s) for s in shape)
    if layout == "tokens":
        if len(shape) != 3:
            raise ValueError(f"{role} feature of shape {shape}: layout='tokens' expects (B, N, C)")
        return shape[0], shape[2], (shape[1],)
    if len(shape) not in (3, 4):
        raise ValueError(
            f"{role} feature of shape {shape}: expected (B, C, H, W) or (B, C, N) "
            "(or pass layout='tokens' for (B, N, C) transformer tokens)"
        )
    return shape[0], shape[1], shape[2:]


def channels(shape: Sequence[int], layout: str = "channels_first", role: str = "feature") -> int:
    """Number of channels of a feature of this shape."""
    return _layout_dims(shape, layout, role)[1]


def positions_match(student_shape, teacher_shape, layout="channels_first") -> bool:
    """Whether two features have the same positions: equal spatial sizes, or as many positions where one side is
    flattened. Refuses a shape the layout cannot read (a ValueError naming the side)."""
    _, _, sp_s = _layout_dims(student_shape, layout, "student")
    _, _, sp_t = _layout_dims(teacher_shape, layout, "teacher")
    return sp_s == sp_t or (min(len(sp_s), len(sp_t)) == 1 and _numel(sp_s) == _numel(sp_t))


def check_spatial(student_shape, teacher_shape, resize=None, layout="channels_first") -> None:
    """Raise a ValueError naming both shapes when their spatial sizes cannot be matched.

    Works on shapes alone so that the registries can report a mismatch before any forward pass.
    """
    check_choice("resize option", resize, RESIZE_MODES)
    if positions_match(student_shape, teacher_shape, layout):
        return
    _, _, sp_s = _layout_dims(student_shape, layout, "student")
    _, _, sp_t = _layout_dims(teacher_shape, layout, "teacher")
    if resize is None:
        raise ValueError(
            f"spatial sizes differ: student {tuple(student_shape)} vs teacher {tuple(teacher_shape)} "
            f"(N={_numel(sp_s)} vs {_numel(sp_t)}); pass resize='pool' (adaptive average pooling of the larger "
            "map) or resize='interpolate' (bilinear resize of the student to the teacher's size)"
        )
    if len(sp_s) != 2 or len(sp_t) != 2:
        raise ValueError(
            f"resize={resize!r} needs (B, C, H, W) maps to know the 2-D grid, got student {tuple(student_shape)} "
            f"and teacher {tuple(teacher_shape)}; reshape flattened maps or tokens to (B, C, H, W) first"
        )


def _numel(dims: Sequence[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def to_bcn(f: Tensor, layout: str = "channels_first", role: str = "feature") -> Tensor:
    """View a feature as ``(B, C, N)``."""
    _layout_dims(f.shape, layout, role)
    if layout == "tokens":
        return f.transpose(1, 2)
    return f.flatten(2)


def resize_pair(f_a: Tensor, f_b: Tensor, resize=None, layout="channels_first") -> tuple[Tensor, Tensor]:
    """Bring two features to the same spatial size (as configured) and return both as ``(B, C, N)``."""
    check_spatial(f_a.shape, f_b.shape, resize, layout)
    if f_a.shape[0] != f_b.shape[0]:
        raise ValueError(f"batch sizes differ: student {tuple(f_a.shape)} vs teacher {tuple(f_b.shape)}")
    if f_a.shape[0] == 0:
        raise ValueError(f"feature loss of an empty batch (B = 0): student {tuple(f_a.shape)}, teacher {tuple(f_b.shape)}")
    if f_a.dim() == 4 and f_a.shape[2:] != f_b.shape[2:] and resize is not None:
        if resize == "pool":
            # Pool whichever map is larger (per axis) down to the smaller grid.
            size = (min(f_a.shape[2], f_b.shape[2]), min(f_a.shape[3], f_b.shape[3]))
            f_a = F.adaptive_avg_pool2d(f_a, size) if f_a.shape[2:] != size else f_a
            f_b = F.adaptive_avg_pool2d(f_b, size) if f_b.shape[2:] != size else f_b
        else:
            f_a = F.interpolate(f_a, size=f_b.shape[2:], mode="bilinear", align_corners=False)
    return to_bcn(f_a, layout, "student"), to_bcn(f_b, layout, "teacher")


_HALF = (torch.float16, torch.bfloat16)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def full_precision(fn):
    """Run a loss with autocast off and half-precision inputs upcast to float32.

    Squared distances and MMD differences cancel badly in bf16/fp16; the Gram products are cheap
    enough to do in float32 under mixed precision. float64 inputs stay float64. The devices whose
    autocast is turned off are those of every tensor argument, positional or keyword; outside
    autocast with float32 inputs the loss is called as it is (the check costs no more than a
    dictionary lookup, which matters for the cheap losses such as AT).
    """

    def upcast(x):
        if isinstance(x, Tensor) and x.dtype in _HALF:
            return x.float()
        if isinstance(x, (tuple, list)):
            return type(x)(upcast(v) for v in x)
        return x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = list(_tensors(args)) + list(_tensors(kwargs.values()))
        device_types = {t.device.type for t in tensors} or {"cpu"}
        autocast_on = sorted(d for d in device_types if _autocast_enabled(d))
        if not autocast_on and not any(t.dtype in _HALF for t in tensors):
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in autocast_on:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            return fn(*(upcast(a) for a in args), **{k: upcast(v) for k, v in kwargs.items()})

    return wrapper


def _tensors(args):
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from _tensors(a)
