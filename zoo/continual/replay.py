"""Replay as loss terms: each draws from the :class:`~zoo.continual.ContinualClassifier`'s buffer.

- :class:`ExperienceReplay` (ER, Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019):
  cross-entropy on a buffer draw; by default (``combine: concat``, Mammoth's ``models/er.py``) the draw joins the
  current batch in one forward and one cross-entropy is taken over both (each replayed sample weighs as much as a
  current one).
- :class:`DarkReplay` (DER / DER++, Buzzega et al., NeurIPS 2020; Mammoth ``models/der.py``, ``derpp.py``):
  ``alpha`` x MSE (mean over samples and all classes, unmasked) between the current logits and those stored at
  insertion (the batch's train-mode output before the optimizer step) on one draw, plus (DER++, ``beta > 0``)
  ``beta`` x cross-entropy on a second.

Under mixed precision (``bf16-mixed``) the replayed (or joined) forward passes run under autocast like the batch's, and the terms
compute their losses in float32 (:func:`~zoo.losses.full_precision`): DER's MSE is between the bf16 logits upcast and
the float32 logits the buffer stored (Mammoth keeps every non-label buffer tensor in float32, ``utils/buffer.py``
``init_tensors``; its bf16 mode, ``--code_optimization 2``, only lowers the matmul precision, so its logits and
losses stay float32).

Replayed samples have no dataset ``index``: the terms run the module's ``forward`` (the whole backbone), never
the per-sample caches a module keeps for its own batches (SubTuning's frozen features). The buffer itself
belongs to the module (FPF draws from it too), which saves every rank's share in its checkpoints::

    model:
      class_path: zoo.continual.ContinualClassifier
      init_args:
        buffer_size: 500
        losses:
          - class_path: zoo.losses.CrossEntropy
          - class_path: zoo.continual.DarkReplay
            init_args: {alpha: 0.1, beta: 0.5}       # = zoo.continual.DERpp
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from zoo.batch import Batch
from zoo.losses import CrossEntropy, LossTerm, Step, full_precision

if TYPE_CHECKING:
    from zoo.continual.module import ContinualClassifier


class ReplayTerm(LossTerm):
    """Base of the replay terms: ``batch_size`` samples per draw (None: the module's ``replay_batch_size``);
    ``replace``: draw with replacement (always ``batch_size`` samples) instead of Mammoth's distinct samples."""

    def __init__(self, weight: float = 1.0, batch_size: int | None = None, replace: bool = False, name: str | None = None):
        super().__init__(weight=weight, name=name)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size={batch_size}: expected a positive integer or null")
        self.batch_size, self.replace = batch_size, bool(replace)

    def setup(self, module, stage: str) -> None:
        from zoo.continual.module import ContinualClassifier

        if not isinstance(module, ContinualClassifier) or module.buffer is None:
            raise ValueError(f"loss term {self.name!r} ({type(self).__name__}) replays the buffer of a zoo.continual.ContinualClassifier "
                             f"(or ER/DER/DERpp) with buffer_size >= 1; {type(module).__name__} has none")

    def draw(self, module: ContinualClassifier) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, task, stored logits)`` of one buffer draw, transformed for training."""
        return module.replay(self.batch_size or module.hparams.replay_batch_size, replace=self.replace)

    def forward(self, step: Step) -> torch.Tensor:
        module = step.module
        if module.buffer is None or len(module.buffer) == 0:  # nothing stored yet (the first step)
            return torch.zeros((), device=step.logits.device)
        return self.replay_loss(module)

    def replay_loss(self, module: ContinualClassifier) -> torch.Tensor:
        raise NotImplementedError


COMBINE = ("concat", "sum")


class ExperienceReplay(ReplayTerm):
    """ER: cross-entropy on a buffer draw (task-masked like the current batch).

    Args:
        combine: ``concat`` (official, Mammoth ``models/er.py``): the draw joins the current batch's inputs
            (:meth:`join`, drawn before the forward), ONE forward runs over both (BatchNorm statistics over the joined
            batch), and one cross-entropy is averaged over both, ``(B·CE_batch + M·CE_draw) / (B + M)``: the term
            returns what it adds to the module's :class:`~zoo.losses.CrossEntropy` term to make that total. The batch's
            own logits (accuracy, the buffer's stored logits, other terms) stay the batch's only. Where the module
            cannot join (SubTuning's frozen features cached per sample index) the draw gets its own forward.
            ``sum``: ``CE_batch + CE_draw`` with a separate forward of the draw: it weighs ``(B + M) / B`` times more,
            e.g. twice for ``B = M``.
    """

    def __init__(self, weight: float = 1.0, batch_size: int | None = None, replace: bool = False, combine: str = "concat",
                 name: str | None = None):
        super().__init__(weight=weight, batch_size=batch_size, replace=replace, name=name)
        if combine not in COMBINE:
            raise ValueError(f"ExperienceReplay: combine={combine!r}: expected one of {COMBINE}")
        self.combine = combine

    def setup(self, module, stage: str) -> None:
        super().setup(module, stage)
        if self.combine == "concat" and module.loss_term(CrossEntropy) is None:
            raise ValueError(f"loss term {self.name!r}: combine: concat averages the draw with the current batch's "
                             "zoo.losses.CrossEntropy term, which the module lacks; add it or set combine: sum")

    def join(self, module: ContinualClassifier, batch: Batch) -> Batch | None:
        """``concat``: the buffer draw, to run in the batch's forward (Mammoth er.py ``torch.cat((inputs, buf_inputs))``)."""
        if self.combine != "concat" or module.buffer is None or len(module.buffer) == 0 or not module.can_join(batch):
            return None
        x, y, t, _ = self.draw(module)
        return Batch(x, y, task=t)

    def forward(self, step: Step) -> torch.Tensor:
        if self.combine == "sum" or step.module.buffer is None or len(step.module.buffer) == 0:
            return super().forward(step)
        module = step.module
        if self.name in step.joined:  # the draw's logits from the batch's forward
            draw, logits = step.joined[self.name]
            draw_ce, m = module.criterion(full_precision(module.mask_logits(logits, draw.task)), draw.targets), len(draw)
        else:  # the module could not join it: its own forward
            x, y, t, _ = self.draw(module)
            draw_ce, m = replay_ce(module, x, y, t), len(y)
        ce = module.loss_term(CrossEntropy)
        current = ce.weight * ce(step)  # the batch's term as the module adds it
        b = len(step.targets)
        return m / (b + m) * (draw_ce - current)

    def replay_loss(self, module: ContinualClassifier) -> torch.Tensor:
        x, y, t, _ = self.draw(module)
        return replay_ce(module, x, y, t)


def replay_ce(module: ContinualClassifier, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The module's cross-entropy on replayed samples (task-masked), in float32."""
    return module.criterion(full_precision(module.mask_logits(module(x), t)), y)


class DarkReplay(ReplayTerm):
    """DER (``beta = 0``) and DER++: ``alpha`` x logit MSE on one draw + ``beta`` x cross-entropy on a second.

    Args:
        alpha: weight of the MSE between current and stored logits.
        beta: weight of the cross-entropy on a second draw (DER++); 0 is DER.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.0, weight: float = 1.0, batch_size: int | None = None, replace: bool = False,
                 name: str | None = None):
        super().__init__(weight=weight, batch_size=batch_size, replace=replace, name=name)
        if alpha < 0 or beta < 0:
            raise ValueError(f"DarkReplay: alpha={alpha}, beta={beta}: expected numbers >= 0")
        self.alpha, self.beta = float(alpha), float(beta)

    def replay_loss(self, module: ContinualClassifier) -> torch.Tensor:
        x, _, _, z = self.draw(module)  # first draw
        loss = self.alpha * F.mse_loss(full_precision(module(x)), z)  # z: float32 (the buffer's)
        if self.beta:
            x2, y2, t2, _ = self.draw(module)  # second draw
            loss = loss + self.beta * replay_ce(module, x2, y2, t2)
        return loss
