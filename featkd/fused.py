"""Fused students: a sweep's members of one student architecture trained as one batched computation.

A :class:`featkd.sweep.SweepMethod` runs the teacher once per batch, then each member's student in turn;
on a GPU, N small students run one after the other leave most of the chip idle. :class:`FusedSweepMethod`
stacks the members' student weights along a new first dimension and runs all the students as one forward
and one backward (``torch.func.vmap`` over ``torch.func.functional_call``: a convolution with stacked
weights becomes one grouped convolution). Each member keeps all else of its own: its terms and their
weights, adapters, optimiser, schedule, gradient clipping, loss scaler and random stream.

How member k stays its own run: its student's parameters and buffers are views of row k of the stacks
(:class:`StackedStudents`), so its own optimiser updates them in place — and with them the stack — and
evaluation, checkpoints and ``featkd eval`` see an ordinary module. Row k of the stacked gradient becomes
its parameters' gradient: member k's loss depends on row k alone, so the gradient of the members' summed
loss is, row by row, each member's own. Member k equals its separate run to float tolerance, not bit for
bit: the batched convolution sums in another order (``tests/test_fused.py``). A fused sweep's checkpoint
is a sweep's: the members' states by name.

What fusing needs beyond a sweep: one student architecture (the same parameter and buffer names, shapes
and dtypes) and a student forward without random operations (one batched forward cannot follow each
member's own random stream, so ``vmap`` is asked to refuse them: dropout in training needs the unfused sweep).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils._pytree import tree_map

from featkd import checkpoint as ckpt
from featkd.engine.method import losses_to_floats
from featkd.hooks import FeatureExtractor
from featkd.model_outputs import logits_of
from featkd.sweep import Member, SharedTeacherOutputs, SweepMethod

RANDOM_OPS = ("fused students run one batched forward, which cannot draw each member's own random numbers, and this "
              "student draws some (dropout): train these members unfused (featkd sweep without --fused) or without "
              "dropout")

# seen with torch 2.11 on an H200 (benchmarks/results/sweep_throughput_bf16_h200.md); the same step runs on the CPU
BATCH_NORM_AUTOCAST = ("fused students with batch norm fail under autocast on CUDA (torch's batched batch norm: "
                       "'Expected running_mean to have type BFloat16 but got Float'): train the fused sweep with "
                       "amp: null, or unfused")


def _architecture(module: nn.Module) -> list[tuple[str, str, tuple, torch.dtype, torch.device]]:
    return ([("parameter", name, tuple(p.shape), p.dtype, p.device) for name, p in module.named_parameters()]
            + [("buffer", name, tuple(b.shape), b.dtype, b.device) for name, b in module.named_buffers()])


def _describe(entry) -> str:
    if entry is None:
        return "nothing more"
    kind, name, shape, dtype, device = entry
    return f"{kind} {name!r} of shape {list(shape)}, {str(dtype).removeprefix('torch.')} on {device}"


def _default_layout(value):
    """A 4-D CUDA tensor copied into the default (contiguous, not channels-last) strides; anything else as it is."""
    if (isinstance(value, torch.Tensor) and value.is_cuda and value.dim() == 4
            and value.stride() != _default_strides(value.shape)):
        return torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)
    return value


def _default_strides(shape) -> tuple[int, ...]:
    strides, size = [], 1
    for extent in reversed(shape):
        strides.append(size)
        size *= extent
    return tuple(reversed(strides))


def _set_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    module.get_submodule(owner_name)._buffers[leaf] = tensor


class StackedStudents:
    """N students of one architecture as stacks of their parameters and buffers.

    ``StackedStudents(students, layers)`` stacks each parameter and buffer (row k: student k's) and makes
    student k's own tensors views of row k, so that updating a student in place updates the stack and the
    other way round. ``stacked(model_input)`` runs every student on the same input in one batched forward:
    ``(logits, features)`` with the students along the first dimension (``(N, B, classes)``; each of
    ``layers`` ``(N, B, ...)``). ``compile``: ``torch.compile`` that forward with these options (``True`` for
    the defaults; ``{"mode": "reduce-overhead"}`` replays it as a CUDA graph where shapes stay fixed). After a
    backward, :meth:`hand_out_gradients` gives each student's parameters their row of the stacked gradient.
    """

    def __init__(self, students: Sequence[nn.Module], layers: Sequence[str] = (), compile: bool | dict = False):
        if not students:
            raise ValueError("StackedStudents needs at least one student")
        reference = _architecture(students[0])
        for k, student in enumerate(students[1:], start=1):
            theirs = _architecture(student)
            if theirs != reference:
                ours, other = next((a, b) for a, b in zip(reference + [None], theirs + [None]) if a != b)
                raise ValueError(f"fused students must share one architecture, and student {k} differs from student 0: "
                                 f"{_describe(other)} where student 0 has {_describe(ours)}; fuse only members of one "
                                 "student model")
        for k, student in enumerate(students[1:], start=1):
            # one template runs them all: a setting that is no tensor (dropout's p, batch norm's eps) must agree too
            ours, theirs = repr(students[0]).splitlines(), repr(student).splitlines()
            if ours != theirs:
                line = next(i for i, (a, b) in enumerate(zip(ours + [""], theirs + [""])) if a != b)
                raise ValueError(f"fused students must be built alike, and student {k} differs from student 0: "
                                 f"{(theirs + [''])[line].strip()!r} where student 0 has {(ours + [''])[line].strip()!r}; "
                                 "fuse only members of one student model and options")
        self.students = list(students)
        # runs every student's weights through functional_call; its own weights are never used
        self.template = copy.deepcopy(students[0])
        self.params = {name: torch.stack([dict(s.named_parameters())[name].detach() for s in students]
                                         ).requires_grad_(True)
                       for name, _ in students[0].named_parameters()}
        self.buffers = {name: torch.stack([dict(s.named_buffers())[name] for s in students])
                        for name, _ in students[0].named_buffers()}
        self._extractor = FeatureExtractor(self.template, list(layers)) if layers else None
        self._forward = self._all_students
        if compile:  # after the hooks are registered, so that they are traced in
            self._forward = torch.compile(self._all_students, **(compile if isinstance(compile, dict) else {}))
        self._bind()

    @property
    def layers(self) -> list[str]:
        return self._extractor.layers if self._extractor is not None else []

    def _bind(self) -> None:
        """Make student k's parameters and buffers views of row k of the stacks."""
        with torch.no_grad():
            for k, student in enumerate(self.students):
                for name, param in student.named_parameters():
                    param.data = self.params[name].detach()[k]
                for name in self.buffers:
                    _set_buffer(student, name, self.buffers[name][k])

    def check_bound(self) -> None:
        """Raise when a student's tensors are no longer views of the stacks (moved with ``.to()``, replaced)."""
        stacks = {**self.params, **self.buffers}
        for k, student in enumerate(self.students):
            tensors = {**dict(student.named_parameters()), **dict(student.named_buffers())}
            moved = [name for name, t in tensors.items() if t.data_ptr() != stacks[name][k].data_ptr()]
            if moved:
                raise RuntimeError(f"fused student {k}'s {moved[0]!r} is no longer a view of its stack (was the student "
                                   "moved or its tensors replaced after fusing?); move students before fusing them")

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def _one_student(self, params, buffers, args, kwargs):
        weights = {**params, **buffers}
        if self._extractor is None:
            return logits_of(torch.func.functional_call(self.template, weights, args, kwargs)), []
        output, features = self._extractor.run(torch.func.functional_call, self.template, weights, args, kwargs)
        return logits_of(output), [features[key] for key in self.layers]

    def _all_students(self, params, buffers, args, kwargs):
        return torch.func.vmap(self._one_student, in_dims=(0, 0, None, None), randomness="error")(
            params, buffers, args, kwargs)

    def __call__(self, model_input) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # torch's vmap cannot ask a batched tensor for its channels-last layout, which CUDA's batch norm does when
        # the input's strides could be read as channels-last (a one-channel image always can): there the students
        # get the batch in the default layout (on the CPU they take it as a separate run does)
        model_input = tree_map(_default_layout, model_input)
        args, kwargs = ((), dict(model_input)) if isinstance(model_input, Mapping) else (
            model_input if isinstance(model_input, tuple) else (model_input,), {})
        try:
            logits, features = self._forward(self.params, self.buffers, args, kwargs)
        except RuntimeError as error:
            if "randomness" in str(error) or "random operation" in str(error):  # a functional dropout, say
                raise ValueError(RANDOM_OPS) from error
            raise
        return logits, dict(zip(self.layers, features))

    def zero_grad(self) -> None:
        for stack in self.params.values():
            stack.grad = None

    def hand_out_gradients(self) -> None:
        """Row k of each stacked gradient becomes student k's parameter's gradient (a view, nothing copied)."""
        for name, stack in self.params.items():
            for k, student in enumerate(self.students):
                student.get_parameter(name).grad = None if stack.grad is None else stack.grad[k]

    def remove(self) -> None:
        if self._extractor is not None:
            self._extractor.remove()


class _StudentRow:
    """Member k's student outputs, read from the fused forward of the current batch."""

    def __init__(self, method: "FusedSweepMethod", row: int):
        self.method, self.row = method, row

    def __call__(self, student_input):
        if self.method.student_outputs is None:
            raise RuntimeError("a fused member ran outside FusedSweepMethod.train_step: no student outputs for this batch")
        logits, features = self.method.student_outputs
        return logits[self.row], {key: value[self.row] for key, value in features.items()}


class FusedSweepMethod(SweepMethod):
    """A :class:`~featkd.sweep.SweepMethod` whose members' students run as one batched computation (see the
    module docstring); members are built as for the sweep (:func:`featkd.sweep.make_member`, or
    ``featkd.sweep.build_sweep(..., method_class=FusedSweepMethod)``) and may also be student-alone ones
    (:class:`~featkd.engine.SupervisedMethod`). ``compile``: see :class:`StackedStudents`."""

    def __init__(self, teacher: nn.Module, members: Sequence[Member], shared: SharedTeacherOutputs,
                 *, precision=None, compile: bool | dict = False):
        super().__init__(teacher, members, shared, precision=precision)
        amps = {m.method.precision.amp for m in self.members}
        if len(amps) > 1:
            raise ValueError(f"fused members ask for autocast {sorted(map(str, amps))}; one batched forward runs them "
                             "all: give every member the same amp")
        student = self.members[0].student  # StackedStudents checks that the others are built alike
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in student.modules()):
            raise ValueError(RANDOM_OPS)
        if (self.precision.enabled and self.precision.device_type == "cuda"
                and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())):
            raise ValueError(BATCH_NORM_AUTOCAST)
        layers = list(dict.fromkeys(layer for m in self.members if m.distiller is not None
                                    for layer in m.distiller.student_layers))
        self.students = StackedStudents([m.student for m in self.members], layers, compile)
        self.student_outputs: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        for row, member in enumerate(self.members):
            member.method.share_model(_StudentRow(self, row))

    def train_step(self, x, y, step, indices=None):
        # the phases are named for torch.profiler (benchmarks/fused_step_profile.py); unprofiled they cost nothing
        with record_function("fused/teacher_forward"):
            self.teacher_forward(x)
        losses: dict[str, torch.Tensor] = {}
        outer = ckpt.rng_state()
        try:
            self.students.train()
            with record_function("fused/students_forward"), self.precision.autocast():
                self.student_outputs = self.students(self.batch_format.model_input(x, "student"))
            total = 0
            with record_function("fused/member_losses"):
                for member in self.members:
                    ckpt.set_rng_state(member.rng if member.rng is not None else outer)
                    loss, member_losses = member.method.step_losses(x, y, step, indices)
                    member.rng = ckpt.rng_state()
                    total = total + member.method.precision.scale(loss)
                    losses.update({f"{member.name}/{k}": v for k, v in member_losses.items()})
            for member in self.members:
                member.method.optimizer.zero_grad(set_to_none=True)
            self.students.zero_grad()
            with record_function("fused/backward"):
                total.backward()
            with record_function("fused/optimizer_steps"):
                self.students.hand_out_gradients()
                for member in self.members:
                    member.method.precision.step(member.method.optimizer, member.method.grad_clip)
        finally:
            ckpt.set_rng_state(outer)
            self.shared.batch, self.shared.logits, self.shared.features = None, None, {}
            self.student_outputs = None
        return losses_to_floats(losses)

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.students.check_bound()  # loading copies into the views; a replaced tensor would silently unfuse

    def close(self) -> None:
        super().close()
        self.students.remove()
