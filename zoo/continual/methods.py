"""The continual methods as presets of :class:`~zoo.continual.ContinualClassifier` (same YAML names as before).

Methods: :class:`FineTune` (lower bound), :class:`Joint` (upper bound), :class:`ER` (Chaudhry et al. 2019),
:class:`DER` and :class:`DERpp` (Buzzega et al., NeurIPS 2020), FPF (``fpf_steps`` on any method) and
:class:`KFPF` (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023). ER, DER and
DER++ are the base class plus a replay loss term (:mod:`zoo.continual.replay`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from zoo.continual.module import ContinualClassifier
from zoo.continual.replay import DarkReplay, ExperienceReplay
from zoo.losses import LossTerm
from zoo.surgery import Surgery


class FineTune(ContinualClassifier):
    """Fine-tuning on each task in turn, no replay: the lower bound of every continual method."""


class Joint(ContinualClassifier):
    """Joint training on all data seen so far (task ``t`` trains on tasks ``0..t``): the upper bound.
    The stream must say so: ``cumulative: true`` on the ``ContinualDataModule`` (checked before training)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self.stream.cumulative:
            raise ValueError("Joint trains on all the tasks seen so far, but the stream gives one task at a time: "
                             "set data.init_args.cumulative: true (datamodules.continual.ContinualDataModule)")


class ER(ContinualClassifier):
    """Experience Replay (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019).

    Cross-entropy on the current batch plus cross-entropy on a reservoir-sampled buffer draw
    (:class:`~zoo.continual.ExperienceReplay`); by default, as Mammoth's ``models/er.py``, the draw joins the batch
    in one forward and one cross-entropy is taken over both. Mammoth's best arguments: ``configs/continual/er_seq_{mnist,cifar10}.yaml``.
    """

    replays = True

    def preset_terms(self) -> list[LossTerm]:
        return [ExperienceReplay()]


class DER(ContinualClassifier):
    """Dark Experience Replay (Buzzega et al., NeurIPS 2020): match the logits stored at insertion time
    (:class:`~zoo.continual.DarkReplay` with ``beta = 0``). The paper's alpha depends on the benchmark (Mammoth
    ``utils/best_args.py``: 1.0 on seq-mnist, 0.3 on seq-cifar10; presets ``configs/continual/der_seq_*.yaml``).

    Args:
        alpha: weight of the MSE between current and stored logits on a buffer draw.
        (others: see :class:`ContinualClassifier`)
    """

    replays = True

    def __init__(
        self,
        model: str | None = "zoo/mlp",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        buffer_size: int = 0,
        buffer_policy: str = "reservoir",
        replay_batch_size: int = 32,
        fpf_steps: int = 0,
        fpf_lr: float = 0.01,
        fpf_alpha: float = 0.0,
        fpf_modules: list[str] | None = None,
        fpf_num_modules: int = 2,
        seed: int = 0,
        eval_seen_classes: bool = True,
        surgery: list[Surgery] | None = None,
        losses: list[LossTerm] | None = None,
        alpha: float = 0.3,
    ):
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, label_smoothing=label_smoothing,
                         buffer_size=buffer_size, buffer_policy=buffer_policy, replay_batch_size=replay_batch_size, fpf_steps=fpf_steps,
                         fpf_lr=fpf_lr, fpf_alpha=fpf_alpha, fpf_modules=fpf_modules, fpf_num_modules=fpf_num_modules, seed=seed,
                         eval_seen_classes=eval_seen_classes,
                         surgery=surgery, losses=losses)

    def preset_terms(self) -> list[LossTerm]:
        return [DarkReplay(alpha=self.hparams.alpha, beta=self.hparams.get("beta", 0.0))]


class DERpp(DER):
    """DER++ (Buzzega et al., NeurIPS 2020): DER's logit term plus beta x cross-entropy on a second buffer draw.

    Args:
        alpha: weight of the logit MSE on the first draw.
        beta: weight of the cross-entropy on the second draw.
        (others: see :class:`ContinualClassifier`)
    """

    def __init__(
        self,
        model: str | None = "zoo/mlp",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        buffer_size: int = 0,
        buffer_policy: str = "reservoir",
        replay_batch_size: int = 32,
        fpf_steps: int = 0,
        fpf_lr: float = 0.01,
        fpf_alpha: float = 0.0,
        fpf_modules: list[str] | None = None,
        fpf_num_modules: int = 2,
        seed: int = 0,
        eval_seen_classes: bool = True,
        surgery: list[Surgery] | None = None,
        losses: list[LossTerm] | None = None,
        alpha: float = 0.1,
        beta: float = 0.5,
    ):
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, label_smoothing=label_smoothing,
                         buffer_size=buffer_size, buffer_policy=buffer_policy, replay_batch_size=replay_batch_size, fpf_steps=fpf_steps,
                         fpf_lr=fpf_lr, fpf_alpha=fpf_alpha, fpf_modules=fpf_modules, fpf_num_modules=fpf_num_modules, seed=seed,
                         eval_seen_classes=eval_seen_classes,
                         surgery=surgery, losses=losses, alpha=alpha)


class KFPF(ContinualClassifier):
    """k-FPF (Zhao et al., ICML 2023): no per-step replay; every ``fpf_every`` optimizer steps, regardless of task
    boundaries, FPF finetunes the forgetting-prone modules for ``fpf_steps`` on the buffer (k = steps / fpf_every).
    FPF also runs at each task end, where the model is evaluated (the paper's final FPF).
    ``fpf_alpha > 0`` gives k-FPF-KD (cross-entropy + ``fpf_alpha`` x MSE to the logits stored at insertion, as in
    DER++), 0 gives k-FPF-CE. FPF is plain SGD on its own (``fpf_lr``), apart from the main optimizer and its state.

    Args:
        fpf_every: optimizer steps between two FPF runs.
        (others: see :class:`ContinualClassifier`)
    """

    def __init__(
        self,
        model: str | None = "zoo/mlp",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        buffer_size: int = 0,
        buffer_policy: str = "reservoir",
        replay_batch_size: int = 32,
        fpf_steps: int = 50,
        fpf_lr: float = 0.01,
        fpf_alpha: float = 0.0,
        fpf_modules: list[str] | None = None,
        fpf_num_modules: int = 2,
        seed: int = 0,
        eval_seen_classes: bool = True,
        surgery: list[Surgery] | None = None,
        losses: list[LossTerm] | None = None,
        fpf_every: int = 100,
    ):
        if fpf_every < 1 or fpf_steps < 1:
            raise ValueError(f"fpf_every={fpf_every}, fpf_steps={fpf_steps}: k-FPF needs both >= 1")
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, label_smoothing=label_smoothing,
                         buffer_size=buffer_size, buffer_policy=buffer_policy, replay_batch_size=replay_batch_size, fpf_steps=fpf_steps,
                         fpf_lr=fpf_lr, fpf_alpha=fpf_alpha, fpf_modules=fpf_modules, fpf_num_modules=fpf_num_modules, seed=seed,
                         eval_seen_classes=eval_seen_classes,
                         surgery=surgery, losses=losses)
        self._fpf_step = -1  # the optimizer step of the last periodic FPF

    def _fpf_due(self) -> bool:
        step = self.global_step  # unchanged over accumulated batches: FPF once per optimizer step
        return step > 0 and step % self.hparams.fpf_every == 0 and step != self._fpf_step

    def step_end(self) -> None:
        super().step_end()
        if self._fpf_due():
            self._fpf_step = self.global_step
            self.fpf(self.hparams.fpf_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # a step checkpoint is written before this hook's FPF of the same step (callbacks' on_train_batch_end run first)
        checkpoint["kfpf_pending"] = self._fpf_due()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._fpf_pending = bool(checkpoint.get("kfpf_pending", False))

    def resume_pending(self) -> None:
        """Resumed from a checkpoint taken just before a periodic FPF (the buffer is restored): run it now, before
        any task end the resumed run catches up (the uninterrupted run ran it first)."""
        super().resume_pending()
        if getattr(self, "_fpf_pending", False):
            self._fpf_pending = False
            self._fpf_step = self.global_step
            self.fpf(self.hparams.fpf_steps)
