"""How featkd reads a batch: what each model is called with, and where the targets and the token mask are.

The one seam for batch kinds: the training loop, :func:`featkd.engine.evaluate` and the
:class:`featkd.Distiller` read every batch through a :class:`BatchFormat`, nothing else looks inside one.

``BatchFormat()`` is the image path, exactly as before: a loader yields ``(x, y)`` or ``(x, y, indices)``
and each model is called as ``model(x)``. A dict batch (what a Hugging Face tokenizer and collator give)
names its parts::

    BatchFormat(inputs=("input_ids", "attention_mask"), targets="labels", mask="attention_mask")

calls each model as ``model(input_ids=..., attention_mask=...)``, takes the targets from ``batch["labels"]``
and hands ``batch["attention_mask"]`` to the token losses, so that padding counts nowhere.
``teacher_inputs`` when the teacher takes other keys than the student (the student alone gets ``labels``
to return its own loss); ``options`` adds keyword arguments to every call (``output_attentions=True`` for
attention transfer); a callable ``batch -> tensor | tuple | dict`` describes any other call.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchFormat", "IMAGES", "batch_size", "call_model", "head", "to_device"]

InputSpec = Sequence[str] | Callable[[Any], Any] | None


def _check_spec(value: Any, what: str) -> InputSpec:
    if value is None or callable(value):
        return value
    keys = (value,) if isinstance(value, str) else value
    if not isinstance(keys, Sequence) or not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"BatchFormat {what} must be None, a batch key, a sequence of keys or a callable "
                        f"batch -> input; got {value!r}")
    return tuple(keys)


def _missing_keys(batch: Mapping, keys: Sequence[str], what: str) -> KeyError:
    missing = [k for k in keys if k not in batch][0]
    close = difflib.get_close_matches(missing, [str(k) for k in batch], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"the batch has no key {missing!r} (BatchFormat {what});{hint} it holds {sorted(map(str, batch))}")


@dataclass(frozen=True)
class BatchFormat:
    """What each model is called with and where a batch keeps its targets and token mask (module docstring).

    Args:
        inputs: ``None`` (the batch's inputs as they are: the image path), dict keys passed as keyword
            arguments, or a callable ``batch -> tensor | tuple | dict`` (a tuple is passed positionally, a
            dict by keyword).
        teacher_inputs: the same for the teacher; ``None``: as the student.
        targets: the key of a dict batch's targets (``labels``); ``None``: no targets (no cross-entropy).
        mask: the key of the token mask (True or 1 at each real token) the token losses use.
        indices: the key of the samples' dataset indices in a dict batch, for losses with per-sample state.
        options: keyword arguments added to every call of either model (``{"output_attentions": True}``).
    """

    inputs: InputSpec = None
    teacher_inputs: InputSpec = None
    targets: str | None = None
    mask: str | None = None
    indices: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "inputs", _check_spec(self.inputs, "inputs"))
        object.__setattr__(self, "teacher_inputs", _check_spec(self.teacher_inputs, "teacher_inputs"))
        for name in ("targets", "mask", "indices"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"BatchFormat {name} must be a batch key (a string) or None, got {value!r}")
        if self.options and (self.inputs is None or callable(self.inputs)):
            raise ValueError("BatchFormat options are keyword arguments added to a call by keys: give inputs=(keys...) "
                             "too, or put them in the inputs callable's dict")

    def split(self, item: Any) -> tuple[Any, Tensor | None, Tensor | None]:
        """A loader's item as ``(the batch, its targets, its dataset indices)``: ``(x, y)``/``(x, y, indices)``
        tuples as they are, a dict batch with its ``targets`` and ``indices`` keys read (the dict stays whole)."""
        if isinstance(item, Mapping):
            wanted = [k for k in (self.targets, self.indices) if k is not None]
            if any(k not in item for k in wanted):
                raise _missing_keys(item, wanted, "targets/indices")
            return (item, item[self.targets] if self.targets else None,
                    item[self.indices] if self.indices else None)
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            return item[0], item[1], item[2] if len(item) == 3 else None
        raise TypeError(f"a training batch is (x, y), (x, y, indices) or a dict read with a BatchFormat; the loader "
                        f"gave {type(item).__name__}" + (f" of {len(item)} items" if isinstance(item, (tuple, list))
                                                         else ""))

    def model_input(self, batch: Any, role: str = "student") -> Any:
        """What the ``role`` (``"student"`` or ``"teacher"``) model is called with (see :func:`call_model`)."""
        spec = self.teacher_inputs if role == "teacher" and self.teacher_inputs is not None else self.inputs
        if spec is None:
            if isinstance(batch, Mapping):
                raise TypeError(f"a dict batch (keys {sorted(map(str, batch))}) needs a BatchFormat that says what the "
                                "models take, e.g. featkd.BatchFormat(inputs=('input_ids', 'attention_mask'), "
                                "targets='labels', mask='attention_mask')")
            return batch
        if callable(spec):
            return spec(batch)
        if not isinstance(batch, Mapping):
            raise TypeError(f"BatchFormat inputs={list(spec)} reads a dict batch, got {type(batch).__name__}")
        if any(k not in batch for k in spec):
            raise _missing_keys(batch, spec, "inputs" if role == "student" else f"{role}_inputs")
        return {**{k: batch[k] for k in spec}, **self.options}

    def call(self, model: Callable, batch: Any, role: str = "student") -> Any:
        """``model`` (or a feature extractor around it) called on ``batch`` as the ``role`` model takes it."""
        return call_model(model, self.model_input(batch, role))

    def mask_of(self, batch: Any) -> Tensor | None:
        """The batch's token mask, or None when the format names none."""
        if self.mask is None:
            return None
        if not isinstance(batch, Mapping) or self.mask not in batch:
            raise _missing_keys(batch if isinstance(batch, Mapping) else {}, [self.mask], "mask")
        return batch[self.mask]

    @property
    def reads_dicts(self) -> bool:
        return self.inputs is not None


IMAGES = BatchFormat()  # (x, y[, indices]) batches, model(x): the image path


def call_model(model: Callable, model_input: Any) -> Any:
    """``model(**input)`` for a dict, ``model(*input)`` for a tuple, ``model(input)`` otherwise."""
    if isinstance(model_input, Mapping):
        return model(**model_input)
    if isinstance(model_input, tuple):
        return model(*model_input)
    return model(model_input)


def to_device(batch: Any, device: torch.device | str | None, channels_last: bool = False) -> Any:
    """The batch's tensors on ``device`` (dicts, tuples and lists walked); 4-D image tensors in channels-last
    memory when asked."""
    if isinstance(batch, Tensor):
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device, channels_last) for value in batch)
    return batch


def head(batch: Any, n: int) -> Any:
    """The batch's first ``n`` samples: each tensor's first ``n`` rows, dicts, tuples and lists walked (a list of
    per-sample entries, a detector's images, cut to ``n``) — a dry run's example."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {key: head(value, n) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(head(value, n) for value in batch)
    if isinstance(batch, list):
        return batch[:n]
    return batch


def batch_size(batch: Any) -> int:
    """How many samples a batch holds: a tensor's first dimension, a list's length (a detector's list of images,
    one per sample), a dict's first entry's."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)):
        return len(batch)
    for value in batch.values() if isinstance(batch, Mapping) else ():
        if isinstance(value, (Tensor, Mapping, tuple, list)):
            return batch_size(value)
    raise TypeError(f"cannot tell the size of a batch of {type(batch).__name__}: it holds no tensor or list")
