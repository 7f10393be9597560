"""Loss terms: the parts of a training objective, summed by a zoo module and logged by name.

A module's total loss is ``sum(term.weight * term(step))`` over its ``losses``; each term is logged as
``train/<name>``. Cross-entropy, the distillation family (:mod:`zoo.distillation`), replay
(:mod:`zoo.continual`) and the MoE load-balance term (:mod:`zoo.emoe`) are all terms, so they combine::

    model:
      class_path: zoo.Classifier
      init_args:
        losses:
          - class_path: zoo.losses.CrossEntropy
            init_args: {weight: 0.5}
          - class_path: zoo.distillation.SoftTargetKL
            init_args: {weight: 0.5, temperature: 4, teacher: runs/teacher/checkpoints/best.ckpt}

A new term is one short class: subclass :class:`LossTerm` and implement :meth:`LossTerm.forward`.

Mixed precision (``precision: bf16-mixed``): the model runs under autocast (bf16 logits), a term computes and returns
its value in at least float32 (:func:`full_precision` on its inputs), on any device: CUDA autocast runs softmax and
the losses in float32 by itself, CPU autocast only the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo import spec
from zoo.batch import Batch

if TYPE_CHECKING:
    from zoo.classifier import Classifier


@dataclass
class Step:
    """What one training step exposes to its loss terms: the module, the named batch, the logits of its
    forward pass, a scratch dict terms may share (e.g. teacher outputs computed once per step), and ``joined``: by
    term name, the samples that term asked to join the batch's forward (:meth:`LossTerm.join`) with their logits
    from that same forward. ``logits`` are only the batch's own."""

    module: Classifier
    batch: Batch
    logits: torch.Tensor
    shared: dict[str, Any] = field(default_factory=dict)
    joined: dict[str, tuple[Batch, torch.Tensor]] = field(default_factory=dict)

    @property
    def targets(self) -> torch.Tensor:
        return self.batch.targets


class LossTerm(nn.Module):
    """One term of the objective: ``weight * forward(step)`` is added to the total, logged as ``train/<name>``.

    Args:
        weight: multiplies the term in the total loss (>= 0).
        name: the logged name (default: the class name in snake case).

    Hooks a term may implement: :meth:`setup` (build, check the datamodule, before training) and
    :meth:`after_step` (e.g. a replay buffer takes the batch). State that must survive a resume lives in
    parameters, buffers or :meth:`get_extra_state` of the term, so it is in the module's checkpoint.
    """

    needs: tuple[str, ...] = ()  # batch fields the term reads beyond inputs and targets

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__()
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{type(self).__name__}: weight={weight!r} must be a number >= 0")
        self.weight = float(weight)
        self.name = name or snake_case(type(self).__name__)

    def setup(self, module: Classifier, stage: str) -> None:
        """Called from the module's ``setup`` (the trainer and datamodule are attached): build and check."""

    def forward(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: Step) -> None:
        """Called after every term of the step was computed."""

    def join(self, module: Classifier, batch: Batch) -> Batch | None:
        """Samples to run in one forward pass together with the training batch (e.g. ER's buffer draw, as Mammoth's
        ``er.py`` concatenates it: BatchNorm statistics over both), before that forward; their logits reach
        :meth:`forward` as ``step.joined[self.name]``. Default None: nothing joins."""
        return None

    def check_batch(self, batch: Batch) -> None:
        """Fail, naming the missing field and the datamodule option, when the batch lacks what the term needs."""
        for f in self.needs:
            batch.require(f, by=f"loss term {self.name!r} ({type(self).__name__})")

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}``: plain data for the hyperparameters (so checkpoints load with weights_only)."""
        return spec.config_of(self)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: half-precision values (bf16/fp16 logits under autocast) upcast, float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i and not name[i - 1].isupper() else c.lower() for i, c in enumerate(name))


class CrossEntropy(LossTerm):
    """Cross-entropy of the module's logits with the batch's targets (the logits go through the module's
    :meth:`~zoo.classifier.Classifier.mask_logits` first, e.g. task-incremental masking), in float32 under mixed
    precision (as ``torch.autocast`` computes ``cross_entropy``)."""

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, name: str | None = None):
        super().__init__(weight=weight, name=name or "cross_entropy")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CrossEntropy: label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def forward(self, step: Step) -> torch.Tensor:
        logits = step.module.mask_logits(step.logits, step.batch.task)
        return F.cross_entropy(full_precision(logits), step.targets, label_smoothing=self.label_smoothing)


def instantiate(term: LossTerm | dict[str, Any]) -> LossTerm:
    """A term, or its ``{class_path, init_args}`` (as stored in a checkpoint's hyperparameters)."""
    return spec.instantiate(term, LossTerm, "losses")


def unique_names(terms: list[LossTerm]) -> None:
    """Two terms may not log under one name: the second of a pair gets ``_1``, and so on."""
    seen: dict[str, int] = {}
    for term in terms:
        if term.name in seen:
            seen[term.name] += 1
            term.name = f"{term.name}_{seen[term.name]}"
        else:
            seen[term.name] = 0
