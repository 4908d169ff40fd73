"""``Distiller``: a frozen teacher, a student and named loss terms between their layers.

>>> distiller = featkd.Distiller(teacher, student, terms=[
...     featkd.Term("group2", loss="at", weight=1e3),
...     featkd.Term("group3", loss="nst", weight=50, options={"kernel": "poly"}),
... ], kd={"loss": "kd", "weight": 16, "T": 4})
>>> distiller.setup(x[:2])                       # dry run: shapes, layouts, adapters, loss parameters
>>> optimizer = build_optimizer(distiller.trainable_parameters())
>>> logits, losses = distiller(x, y)             # losses: ce, kd, at:group2, nst:group3, total
>>> losses["total"].backward()

Features come from forward hooks (:class:`featkd.FeatureExtractor`), so no model
is rewritten and the names are those of ``model.named_modules()`` (``module.``
prefixes of DDP-wrapped models are handled by the capture). The teacher is
frozen: its parameters do not require grad, it stays in eval mode even when
``distiller.train()`` is called, it runs under ``no_grad`` and its features are
detached. Every value of the returned loss dict is already weighted, so the
terms add up to ``total``.

Teacher and student may be any backbones: each captured feature's layout (channels-first or -last
maps, tokens) is resolved at the dry run (:mod:`featkd.layouts`) and the losses see channels-first
views, with an adapter between tokens and maps where the shapes need one. A teacher that expects
another input normalisation than the student gets the batch converted (``teacher_normalization``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from featkd.batches import IMAGES, BatchFormat, call_model
from featkd.calibration import RelativeToCE
from featkd.hooks import FeatureExtractor
from featkd.layer_info import describe_features
from featkd.layer_specs import LayerKeyError, unwrap
from featkd.losses import BatchContext, build_logit_loss
from featkd.model_outputs import TaskLoss, logits_of, token_rows
from featkd.models import check_input
from featkd.teacher_input import TEACHER_BN_MODES, InputConversion, Normalization, normalization, teacher_bn_mode
from featkd.terms import Term, Warmup, build_term_pairs, call_loss, check_weight, view, weight_at, with_mask

__all__ = ["Distiller", "InputConversion", "NOT_SET_UP", "TEACHER_BN_MODES", "teacher_bn_mode"]

# Why a Distiller refuses to run or hand out its parameters before setup (setting itself up on the first
# batch would leave the adapters and loss parameters out of an optimiser built on the student's parameters).
NOT_SET_UP = ("the Distiller is not set up: its adapters and loss parameters are built in setup and must be in the "
              "optimiser; call distiller.setup(example_x), then build the optimiser on "
              "distiller.trainable_parameters()")


# --------------------------------------------------------------------------- the distiller


def _extractor(role: str, model: nn.Module, layers: list[str], **options) -> FeatureExtractor:
    """A :class:`FeatureExtractor` whose unknown-layer error says which network lacks the layer."""
    try:
        return FeatureExtractor(model, layers, **options)
    except LayerKeyError as error:
        raise LayerKeyError(f"{role} {type(unwrap(model)).__name__}: {error}") from None


def _build_logit_loss(kd) -> tuple[nn.Module | None, float | Warmup]:
    """``kd`` as None, a name, a dict ``{loss: name, weight: w, **options}`` or a module."""
    if kd is None:
        return None, 0.0
    if isinstance(kd, nn.Module):
        return kd, 1.0
    if isinstance(kd, str):
        return build_logit_loss(kd), 1.0
    if isinstance(kd, Mapping):
        options = dict(kd)
        name = options.pop("loss", "kd")
        weight = options.pop("weight", 1.0)
        if isinstance(name, nn.Module):
            return name, weight
        try:
            return build_logit_loss(name, **options), weight
        except ValueError as error:
            raise ValueError(f"kd loss {name!r} with options {options}: {error}") from None
    raise TypeError(f"kd must be None, a loss name, a dict {{loss:, weight:, options...}} or an nn.Module; got {kd!r}")


class Distiller(nn.Module):
    """Teacher + student + named transfer terms (+ an optional logit term); see the module docstring.

    Args:
        teacher, student: any ``nn.Module`` (possibly DDP-wrapped): classifiers, Hugging Face models,
            detectors (their output is read by :func:`featkd.model_outputs.logits_of`).
        terms: :class:`featkd.Term` objects.
        kd: the logit term: ``None``, a name (``"kd"``), ``{"loss": "kd", "weight": 0.9, "T": 4}``
            or a module ``(student_logits, teacher_logits, targets)``. Per-token logits (B, L, V) are
            distilled over the batch's valid tokens (:func:`featkd.model_outputs.token_rows`).
        ce_weight: weight of the task loss: the cross-entropy on labelled samples (targets ``-1`` are
            skipped) unless ``task_loss`` says otherwise.
        task_loss: the student's own objective (:class:`featkd.model_outputs.TaskLoss`): ``"ce"``,
            ``"model"`` (the loss the student returns), ``{loss name: weight}`` or a callable.
        batch_format: how to call the models on a batch and where its targets and token mask are
            (:class:`featkd.BatchFormat`); default: image batches, ``model(x)``.
        compile: ``torch.compile`` the student (after its hooks are registered) with these options
            (``True`` for the defaults).
        teacher_bn: ``"eval"`` (default): the teacher's BN layers use their running statistics;
            ``"batch_stats"``: they normalise each batch with its own statistics, as the official NST
            code ran its teacher, leaving the running statistics as they are (:func:`teacher_bn_mode`).
        student_normalization, teacher_normalization: the per-channel ``(mean, std)`` (on the images'
            0..1 scale) the batch is normalised with, and the one the teacher expects, or
            ``"pretrained_cfg"`` for what a timm model records. When both are given and differ, the
            teacher gets ``(x * std_s + mean_s - mean_t) / std_t``; neither: the batch as it is.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, terms: Sequence[Term] = (), kd=None,
                 ce_weight: float | Warmup = 1.0, compile: bool | dict = False, teacher_bn: str = "eval",
                 student_normalization=None, teacher_normalization=None, task_loss="ce",
                 batch_format: BatchFormat = IMAGES):
        super().__init__()
        if not isinstance(batch_format, BatchFormat):
            raise TypeError(f"batch_format must be a featkd.BatchFormat, got {batch_format!r}")
        self.batch_format, self.task_loss = batch_format, TaskLoss(task_loss)
        # the image path logs its task loss as "ce", as it always has; any other objective as "task"
        self.task_key = "ce" if task_loss == "ce" else "task"
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"teacher_bn must be one of {list(TEACHER_BN_MODES)}, got {teacher_bn!r}")
        self.teacher_bn = teacher_bn
        normalizations = (normalization(student_normalization, student, "student"),
                          normalization(teacher_normalization, teacher, "teacher"))
        if (normalizations[0] is None) != (normalizations[1] is None):
            given, missing = ("student", "teacher") if normalizations[1] is None else ("teacher", "student")
            raise ValueError(f"{given}_normalization is given but {missing}_normalization is not: converting the "
                             f"batch for the teacher needs both (the batch's and the teacher's mean/std)")
        if batch_format.reads_dicts and normalizations[0] is not None:
            raise ValueError("student/teacher_normalization convert an image batch; a dict batch's teacher input is "
                             "given by BatchFormat(teacher_inputs=...)")
        self.teacher_input = InputConversion(*normalizations)  # the batch as the teacher expects it
        self.teacher, self.student = teacher, student
        self.terms = list(terms)
        for term in self.terms:  # "group*" -> group1, group2, group3 (module order), before any name is used
            term.expand_globs(teacher, student)
        keys = [t.key for t in self.terms]
        duplicates = sorted({k for k in keys if keys.count(k) > 1} | ({"ce", "task", "kd", "total"} & set(keys)))
        if duplicates:
            raise ValueError(f"term names must be unique and not ce/task/kd/total: {duplicates}; give the terms "
                             "name=...")
        self.kd_loss, self.kd_weight = _build_logit_loss(kd)
        self.ce_weight = ce_weight
        check_weight(self.kd_weight, "kd weight")
        check_weight(ce_weight, "ce_weight")
        if not self.terms and self.kd_loss is None:
            raise ValueError("nothing to distill: give at least one Term or a kd loss")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_layers = list(dict.fromkeys(name for t in self.terms for name in t.teacher_layers))
        student_layers = list(dict.fromkeys(name for t in self.terms for name in t.student_layers))
        self._teacher_features = _extractor("teacher", teacher, self.teacher_layers, detach=True, no_grad=True)
        self._teacher_outputs = self._own_teacher  # batch -> (teacher output, teacher features)
        # Hooks are registered on the student before torch.compile first runs it, so they are traced in.
        runner = student
        if compile:
            runner = torch.compile(student, **(compile if isinstance(compile, dict) else {}))
        self._student_features = _extractor("student", runner, student_layers)
        self._student_outputs = self._own_student  # student input -> (student output, student features)
        self.adapters = nn.ModuleList()
        self.term_losses = nn.ModuleList()
        self.is_setup = False

    # -- the teacher's input -----------------------------------------------------------

    @property
    def input_normalizations(self) -> tuple[Normalization, Normalization] | None:
        """(the batch's, the teacher's) normalisation when the batch is converted for the teacher, else None."""
        return self.teacher_input.normalizations

    def _model_input(self, x, role: str):
        """What the ``role`` model is called with on batch ``x`` (an image batch converted for the teacher)."""
        model_input = self.batch_format.model_input(x, role)
        if role == "teacher":
            return self.teacher_input(model_input)  # a dict batch is never converted (refused at construction)
        check_input(self.student, model_input)
        return model_input

    def _own_teacher(self, x):
        return call_model(self._teacher_features, self._model_input(x, "teacher"))

    def _own_student(self, student_input):
        return call_model(self._student_features, student_input)

    @property
    def student_layers(self) -> list[str]:
        """The student layers the terms read (globs expanded), in order."""
        return self._student_features.layers

    # -- setup ------------------------------------------------------------------------

    @torch.no_grad()
    def setup(self, example_x) -> Distiller:
        """Dry-run both networks on ``example_x`` (two samples suffice) and build layouts, adapters and losses.

        Call it before building the optimizer so that adapter and loss parameters
        are part of :meth:`trainable_parameters`. Running twice is a no-op.
        """
        if self.is_setup:
            return self
        t_features = describe_features(self.teacher, self.teacher_layers, self._model_input(example_x, "teacher"))
        s_features = describe_features(self.student, self._student_features.layers,
                                       self._model_input(example_x, "student"))
        for extractor in (self._student_features, self._teacher_features):
            extractor.clear()  # their hooks stored the dry run's features too
        device = next(self.student.parameters()).device
        self._layouts = []
        for term in self.terms:
            built = build_term_pairs(term, s_features, t_features, device)
            self.adapters.append(built.adapters)
            self.term_losses.append(built.losses)
            self._layouts.append((built.student_layouts, built.teacher_layouts))
        self._multi_layer = [term.multi_layer for term in self.terms]
        if self.kd_loss is not None:
            self.kd_loss.to(device)
        self.is_setup = True
        return self

    def train(self, mode: bool = True) -> Distiller:
        """Set the student (and adapters, losses) to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, adapter and loss parameters (the teacher's are frozen), each once."""
        if not self.is_setup:
            raise RuntimeError(NOT_SET_UP)
        params: dict[int, nn.Parameter] = {}
        for module in (self.student, self.adapters, self.term_losses, self.kd_loss):
            if module is not None:
                params.update((id(p), p) for p in module.parameters() if p.requires_grad)
        return list(params.values())

    def share_teacher(self, teacher_outputs) -> None:
        """Take the teacher's ``(logits, features)`` from ``teacher_outputs(x)`` instead of running it.

        For several students trained against one teacher forward per batch (:mod:`featkd.sweep`):
        the features must hold :attr:`teacher_layers`, from the teacher run on :meth:`teacher_input`. This
        distiller's own teacher hooks are removed, so the teacher's forward stores each layer once, for
        whoever ran it. Call it after :meth:`setup` (the dry run needs the real teacher).
        """
        if not self.is_setup:
            raise RuntimeError("call distiller.setup(example_x) before share_teacher: the dry run needs the teacher")
        self._teacher_features.remove()
        self._teacher_outputs = teacher_outputs

    def share_student(self, student_outputs) -> None:
        """Take the student's ``(output, features)`` from ``student_outputs(student_input)`` instead of running it.

        For students trained as one batched computation (:mod:`featkd.fused`): the features must hold
        :attr:`student_layers` as this distiller's student would have given them, with their autograd
        graph. Call it after :meth:`setup` (the dry run needs the real student).
        """
        if not self.is_setup:
            raise RuntimeError("call distiller.setup(example_x) before share_student: the dry run needs the student")
        self._student_outputs = student_outputs

    def loss_weights(self) -> dict[str, object]:
        """``{"kd": weight, <term key>: weight, ...}``: each loss's weight as given (a float, a schedule such as
        :class:`featkd.Warmup`, or a :class:`featkd.calibration.RelativeToCE` not yet resolved)."""
        weights = {"kd": self.kd_weight} if self.kd_loss is not None else {}
        weights.update((term.key, term.weight) for term in self.terms)
        return weights

    def set_loss_weights(self, weights: Mapping[str, object]) -> None:
        """Replace the weights of the named losses (``"kd"`` or term keys), e.g. by calibrated absolute ones."""
        unknown = sorted(set(weights) - set(self.loss_weights()))
        if unknown:
            raise KeyError(f"no loss named {unknown}; the distiller's losses: {list(self.loss_weights())}")
        for term in self.terms:
            term.weight = weights.get(term.key, term.weight)
        self.kd_weight = weights.get("kd", self.kd_weight)

    def unweighted_losses(self, x, y: torch.Tensor | None = None, *, step: int | None = None,
                          epoch: float | None = None, indices: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Student logits and each loss before its weight: ``{"kd", <term names>..., <task>}``, the task loss
        (``"ce"``, or ``"task"`` for another objective) last and only when there is one."""
        if not self.is_setup:
            raise RuntimeError(NOT_SET_UP)
        student_input = self._model_input(x, "student")  # a batch the student cannot take is refused first
        with teacher_bn_mode(self.teacher, self.teacher_bn):
            teacher_output, f_t = self._teacher_outputs(x)
        student_output, f_s = self._student_outputs(student_input)
        student_logits = logits_of(student_output)
        mask = self.batch_format.mask_of(x)
        values: dict[str, torch.Tensor] = {}
        if self.kd_loss is not None:
            s_rows, y_rows = token_rows(student_logits, mask, y if y is not None and y.dim() > 1 else None)
            t_rows, _ = token_rows(logits_of(teacher_output), mask)
            values["kd"] = self.kd_loss(s_rows, t_rows, y if y_rows is None else y_rows)
        context = BatchContext(y, step, epoch, indices)
        for term, multi_layer, adapters, pair_losses, (s_layouts, t_layouts) in zip(
                self.terms, self._multi_layer, self.adapters, self.term_losses, self._layouts):
            s = [view(f_s[name], layout) for name, layout in zip(term.student_layers, s_layouts)]
            t = [view(f_t[name], layout) for name, layout in zip(term.teacher_layers, t_layouts)]
            contexts = [with_mask(context, mask, layout) for layout in s_layouts]
            if multi_layer:
                values[term.key] = call_loss(pair_losses[0], s, t, contexts[0])
            else:
                values[term.key] = sum(call_loss(loss, adapter(f), g, c)
                                       for adapter, loss, f, g, c in zip(adapters, pair_losses, s, t, contexts))
        task = self.task_loss(student_output, student_logits, y, x, mask)
        if task is not None:
            values[self.task_key] = task
        return student_logits, values

    def forward(self, x, y: torch.Tensor | None = None, *, step: int | None = None,
                epoch: float | None = None, indices: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Student logits and the weighted losses ``{"ce" (or "task"), "kd", <term names>..., "total"}``.

        ``x`` is the batch as :attr:`batch_format` reads it (an image tensor by default, or a dict).
        ``y`` may hold ``-1`` for unlabelled samples (no CE for them; KD and feature
        terms use every sample); without ``y`` there is no CE term. ``step`` and
        ``epoch`` drive weight schedules (full weights when omitted). Losses that use the
        per-batch context (``uses_context``) receive ``y``, ``step``, ``epoch``, the samples'
        dataset ``indices`` and the batch's token mask as a :class:`featkd.losses.BatchContext`.
        """
        if not self.is_setup:  # set up here, its adapters and loss parameters would miss the optimiser
            raise RuntimeError(NOT_SET_UP)
        weights = self.loss_weights()
        unresolved = [key for key, weight in weights.items() if isinstance(weight, RelativeToCE)]
        if unresolved:
            raise RuntimeError(f"the weights of {unresolved} are relative to the cross-entropy: resolve them with "
                               "featkd.calibration.calibrate_weights(distiller, x, y) on a training batch first")
        student_logits, values = self.unweighted_losses(x, y, step=step, epoch=epoch, indices=indices)
        losses: dict[str, torch.Tensor] = {}
        task = values.pop(self.task_key, None)
        ce_weight = weight_at(self.ce_weight, step, epoch)
        if task is not None and ce_weight:
            losses[self.task_key] = ce_weight * task
        for key, value in values.items():
            losses[key] = weight_at(weights[key], step, epoch) * value
        if not losses:
            raise ValueError("this batch gives no loss to train on (no targets for the task loss and every other "
                             "weight is 0)")
        losses["total"] = sum(losses.values())
        return student_logits, losses

    def remove_hooks(self) -> None:
        """Remove the capture hooks from both networks (the distiller cannot be used afterwards)."""
        self._teacher_features.remove()
        self._student_features.remove()

    def extra_repr(self) -> str:
        terms = ", ".join(f"{t.key}×{t.weight}" for t in self.terms)
        return (f"terms=[{terms}], kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"teacher_bn={self.teacher_bn}")
