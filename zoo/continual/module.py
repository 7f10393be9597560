""":class:`ContinualClassifier`: a :class:`zoo.Classifier` trained on a task stream, with a replay buffer, task-end
evaluation (the accuracy matrix), module drift and FPF.

One ``zoo fit`` runs the whole stream (epoch ``e`` trains task ``e // epochs_per_task``). When a task ends the
module measures how far each module drifted, runs FPF if asked, tests every task seen so far (a row of the
accuracy matrix) and announces it to the callbacks (:meth:`ContinualClassifier.announce_task_end`, which calls
their ``on_task_end``; e.g. :class:`callbacks.continual_metrics.ContinualMetrics`). Task ends are handled at the
start of the next task's first epoch (and at the end of training), so any end-of-epoch checkpoint resumes exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from datamodules.continual import ContinualDataModule
from datamodules.tensor import eval_batches
from zoo import sharding
from zoo.batch import Batch
from zoo.classifier import Classifier
from zoo.continual.buffer import ReplayBuffer
from zoo.continual.replay import ReplayTerm
from zoo.losses import LossTerm
from zoo.resume import gather_object
from zoo.subtuning.prefix import FrozenPrefix
from zoo.surgery import Surgery


def module_drift(model: nn.Module, anchor: dict[str, torch.Tensor]) -> dict[str, float]:
    """(1/|θ|)·‖θ − θ_anchor‖₁ of every module that owns parameters (Zhao et al. 2023, Sec. 3)."""
    drift = {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(prefix=name, recurse=False))
        if params:
            numel = sum(p.numel() for _, p in params)
            # whole tensors when sharded (anchors are kept whole; gathering is a collective, every rank in the same order)
            drift[name] = sum((sharding.whole(p.detach()) - _anchored(anchor, n).to(p.device)).abs().sum().item() for n, p in params) / numel
    return drift


def _anchored(anchor: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The anchor of parameter ``name``, also across ``torch.nn.utils.prune``'s renaming (``weight`` <-> ``weight_orig``:
    a pruning callback may start or bake in its masks between the anchor and the drift)."""
    for key in (name, name.removesuffix("_orig"), name + "_orig"):
        if key in anchor:
            return anchor[key]
    raise KeyError(f"no anchor for parameter {name!r}")


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor /= dist.get_world_size()


class ContinualClassifier(FrozenPrefix, Classifier):
    """Sequential training on the stream: plain fine-tuning, and the base of every replay method.

    Args (beyond :class:`~zoo.classifier.Classifier`'s):
        buffer_size: samples in the replay memory over all ranks (0: none).
        buffer_policy: ``reservoir`` or ``balanced`` (see :mod:`zoo.continual.buffer`).
        replay_batch_size: samples drawn from the buffer per replay draw (replay terms and FPF).
        fpf_steps: at each task end, finetune the forgetting-prone modules this many SGD steps on the buffer (FPF).
        fpf_lr: learning rate of FPF.
        fpf_alpha: weight of the logit-matching (MSE to stored logits) term of FPF (0: cross-entropy only).
        fpf_modules: names (or class names, e.g. ``BatchNorm2d``) of the forgetting-prone modules; ``null``:
            the ``fpf_num_modules`` modules with the largest measured drift.
        fpf_num_modules: how many modules FPF picks by drift.
        seed: seed of the buffer's random stream.
        eval_seen_classes: class-incremental streams: after task ``t`` every task is tested over the classes seen so
            far (the logits of later tasks' classes ignored), as Mammoth's ``evaluate`` does (the accuracy matrix's
            rows before the last, so forgetting and BWT, follow); false: over all classes. The last row is the same.
        surgery: transforms of the backbone, e.g. ``zoo.subtuning.Freeze`` (SubTuning inside the stream).
        losses: the loss terms (default cross-entropy); a preset adds its replay term unless one of its type is given.
    """

    replays = False  # the method needs a buffer

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
    ):
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, label_smoothing=label_smoothing,
                         surgery=surgery, losses=losses)
        for term in self.preset_terms():
            if self.loss_term(type(term)) is None:
                self.add_loss(term)
        name = type(self).__name__
        replays = self.replays or any(isinstance(t, ReplayTerm) for t in self.losses)
        if buffer_size < 0 or (buffer_size == 0 and (replays or fpf_steps > 0)):
            need = "replays from a buffer" if replays else f"runs FPF (fpf_steps={fpf_steps}) on the buffer"
            raise ValueError(f"buffer_size={buffer_size}: {name} {need}; give buffer_size >= 1 (FineTune needs none)")
        if replay_batch_size < 1 or fpf_steps < 0 or fpf_num_modules < 1:
            raise ValueError(f"replay_batch_size={replay_batch_size}, fpf_steps={fpf_steps}, fpf_num_modules={fpf_num_modules}: "
                             "expected replay_batch_size >= 1, fpf_steps >= 0, fpf_num_modules >= 1")
        self.buffer = ReplayBuffer(buffer_size, buffer_policy, seed) if buffer_size else None
        self.stream: ContinualDataModule | None = None
        self.acc_matrix: torch.Tensor | None = None  # [after task i, on task j]
        self.tasks_finished = 0
        self.drift: dict[str, float] = {}  # summed over task ends
        self.anchor: dict[str, torch.Tensor] = {}  # parameters at the last task end
        self._saved_shares: list[dict[str, Any]] | None = None  # buffer shares of a checkpoint, restored at train start

    def preset_terms(self) -> list[LossTerm]:
        """The loss terms a preset adds to ``losses`` (ER: :class:`~zoo.continual.ExperienceReplay`, ...)."""
        return []

    # -- the stream -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        stream = self.trainer.datamodule
        if not isinstance(stream, ContinualDataModule):
            raise TypeError(f"{type(self).__name__} trains on a datamodules.continual.ContinualDataModule, got {type(stream).__name__}")
        if stream.num_classes != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} but the stream has {stream.num_classes} labels")
        self.stream = stream
        mask = torch.zeros(stream.num_tasks, self.num_classes, dtype=torch.bool)
        for t in range(stream.num_tasks):
            mask[t, stream.task_labels(t)] = True
        self.register_buffer("task_mask", mask, persistent=False)
        if self.acc_matrix is None:
            self.acc_matrix = torch.full((stream.num_tasks, stream.num_tasks), math.nan)
        if self.buffer is not None and self.buffer.seen == 0:
            self.buffer.set_share(self.trainer.world_size, self.trainer.global_rank)
        names = dict(self.named_modules())
        for spec in self.hparams.fpf_modules or []:
            if not self._matching(spec):
                raise ValueError(f"fpf_modules: {spec!r} names no module; modules with parameters: "
                                 f"{[n for n, m in names.items() if list(m.parameters(recurse=False))]}")
        super().setup(stage)

    def mask_logits(self, logits: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Task-incremental: logits outside the task's classes are pushed to the minimum."""
        if task is None or self.stream is None or self.stream.scenario != "task":
            return logits
        return logits.masked_fill(~self.task_mask[task], torch.finfo(logits.dtype).min)

    def replay(self, n: int, replace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` buffer samples (distinct, at most all the buffer holds; ``replace``: ``n`` with replacement),
        transformed for training: ``(x, y, task, stored_logits)``."""
        x, y, t, z = self.buffer.sample(n, replace=replace)
        return self.stream.buffer_transform(x), y, t, z

    def can_join(self, batch: Batch) -> bool:
        """Whether replayed samples can join the batch's forward (:meth:`~zoo.losses.LossTerm.join`): tensor inputs, and
        no frozen prefix cached per sample index (replayed samples have none: they then get their own forward)."""
        return isinstance(batch.inputs, torch.Tensor) and not (self.freeze is not None and self.freeze.cache_frozen_features)

    def batch_logits(self, batch: Batch) -> torch.Tensor:
        logits = super().batch_logits(batch)
        if self.training and self.buffer is not None:
            # unmasked, all classes, train mode, before the optimizer step: Mammoth der.py stores ``outputs.data``
            self.__dict__["_step_logits"] = logits
        return logits

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss terms (cross-entropy, replay), then the batch is offered to the buffer (inputs before augmentation;
        the batch's own logits: a draw joined to its forward comes after them)."""
        total, logits, y = super().training_loss(batch)
        if self.buffer is not None:
            who = f"{type(self).__name__}'s replay buffer"
            stored = self.__dict__.pop("_step_logits")[:len(y)].detach()
            self.buffer.add(batch.require("raw", by=who), y, batch.require("task", by=who), stored)
        return total, logits, y

    # -- task ends ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._saved_shares is not None and self.buffer is not None:
            self._restore_buffer(self._saved_shares)
        self._saved_shares = None
        if self.buffer is not None:
            self.buffer.to(self.device)
        self.resume_pending()
        # a run resumed from a checkpoint of an epoch's last batch starts the next epoch without on_train_epoch_start
        # (Lightning counts it as restarted mid-epoch): the task that ended with that epoch is finished here
        self._finish_tasks(self.stream.task_of_epoch(self.current_epoch), final=False)

    def resume_pending(self) -> None:
        """Work a resumed run owes before its first batch (the checkpoint was written before it); none here."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if not self.anchor:
            self.anchor = {n: sharding.whole(p.detach()).clone() for n, p in self.named_parameters()}  # whole when sharded
        self._finish_tasks(self.stream.task_of_epoch(self.current_epoch), final=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The step's own work (:meth:`step_end`), then the final task end (drift, FPF, accuracy row) after the run's
        last batch: before validation and every epoch-end or train-end checkpoint, so ``last.ckpt`` is the final state."""
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.step_end()
        trainer = self.trainer
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if (0 <= trainer.max_steps <= self.global_step
                or (last_batch and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.current_epoch + 1)):
            self._finish_final(epochs_done=self.current_epoch + 1)

    def step_end(self) -> None:
        """Work after each optimizer step (KFPF: its periodic FPF); none here."""

    def on_train_epoch_end(self) -> None:
        """Final task end of a run stopped early (``trainer.should_stop``, e.g. early stopping on validation): module
        hooks run before the checkpoint callbacks' epoch-end hooks."""
        super().on_train_epoch_end()
        if self.trainer.should_stop:
            self._finish_final(epochs_done=self.current_epoch + 1)

    def on_train_end(self) -> None:
        """Fallback for a stop decided after this module's on_train_epoch_end (e.g. early stopping on training
        metrics; a no-op otherwise): the final task end is then missing from a last.ckpt written before it."""
        super().on_train_end()
        self._finish_final(epochs_done=self.current_epoch)

    def _finish_final(self, epochs_done: int) -> None:
        """The task ends owed after ``epochs_done`` training epochs (a task started counts), the last one ``final``."""
        self._finish_tasks(min(math.ceil(epochs_done / self.stream.epochs_per_task), self.stream.num_tasks), final=True)

    def _finish_tasks(self, until: int, final: bool) -> None:
        while self.tasks_finished < until:
            t = self.tasks_finished
            self.end_of_task(t)
            self.acc_matrix[t, :t + 1] = torch.tensor([self.evaluate_task(j, after=t) for j in range(t + 1)])
            self.tasks_finished += 1
            self.announce_task_end(t, final and self.tasks_finished == until)

    def announce_task_end(self, task: int, final: bool) -> None:
        """Call ``on_task_end(trainer, module, task, final)`` of every callback that has it (the accuracy matrix's
        row ``task`` is filled; ``final``: the stream's last task end of this run)."""
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "on_task_end", None)
            if callable(hook):
                hook(self.trainer, self, task, final)

    def end_of_task(self, task: int) -> None:
        """Measure each module's drift over the task, then FPF if ``fpf_steps``."""
        for name, d in module_drift(self, self.anchor).items():
            self.drift[name] = self.drift.get(name, 0.0) + d
        self.anchor = {n: sharding.whole(p.detach()).clone() for n, p in self.named_parameters()}  # whole when sharded
        if self.hparams.fpf_steps:
            self.fpf(self.hparams.fpf_steps)

    @torch.no_grad()
    def evaluate_task(self, task: int, batch_size: int = 1024, after: int | None = None) -> float:
        """Test accuracy on one task of the stream (the whole backbone runs). The test set is read from memory in
        large batches (:func:`~datamodules.tensor.eval_batches`), each rank its share; the counts are summed over
        the ranks, so every rank returns the same accuracy. ``fast_dev_run``: the first ``batch_size`` samples.
        ``after``: the last task trained; with ``eval_seen_classes`` a class-incremental prediction is then the best
        of the classes of tasks ``0..after`` (Mammoth's ``outputs[:, :n_seen_classes]``)."""
        trainer = self.trainer
        seen = None
        if after is not None and self.hparams.get("eval_seen_classes", False) and self.stream.scenario == "class":
            seen = self.task_mask[:after + 1].any(0)
        limit = batch_size if trainer.fast_dev_run else None
        was_training, counts = self.training, torch.zeros(2, dtype=torch.float64, device=self.device)
        self.eval()
        for batch in eval_batches(self.stream.task_set("test", task), batch_size, self.device, trainer.global_rank, trainer.world_size,
                                  limit=limit, collate_fn=self.stream.collate_fn):
            logits = self.mask_logits(self(batch.inputs), batch.task)
            if seen is not None:
                logits = logits.masked_fill(~seen, torch.finfo(logits.dtype).min)
            counts[0] += (logits.argmax(-1) == batch.targets).sum()
            counts[1] += len(batch)
        self.train(was_training)
        correct, total = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        return correct / total if total else math.nan

    # -- FPF --------------------------------------------------------------------------------
    def _matching(self, spec: str) -> list[str]:
        return [n for n, m in self.named_modules() if list(m.parameters(recurse=False))
                and (n == spec or n.startswith(spec + ".") or type(m).__name__ == spec)]

    def forgetting_prone_modules(self) -> list[str]:
        """The modules FPF finetunes: named in ``fpf_modules``, or the largest measured drift."""
        if self.hparams.fpf_modules:
            return sorted({n for spec in self.hparams.fpf_modules for n in self._matching(spec)})
        current = module_drift(self, self.anchor)
        score = {n: self.drift.get(n, 0.0) + d for n, d in current.items()}
        return sorted(sorted(score, key=lambda n: (-score[n], n))[:self.hparams.fpf_num_modules])

    @torch.enable_grad()
    def fpf(self, steps: int) -> None:
        """Finetune only the forgetting-prone modules on the buffer with plain SGD (Zhao et al. 2023); frozen
        parameters (e.g. SubTuning's) stay as they are."""
        sharded = sharding.is_sharded(self)
        if sharded:  # the shards themselves (FSDP's root keeps its parameters gathered after a forward, e.g. validation)
            sharding.reshard(self)
        modules = dict(self.named_modules())
        params = [p for n in self.forgetting_prone_modules() for p in modules[n].parameters(recurse=False) if p.requires_grad]
        if not params:
            return
        # the shards, listed now: after a forward FSDP's roots register their gathered parameters instead, so
        # ``self.zero_grad()`` there would miss the shards' .grad (the main step's, which backward would add to);
        # that .grad is set aside and put back after FPF, as the unsharded path leaves it untouched
        shards = list(self.parameters()) if sharded else []
        kept = [p.grad for p in shards]
        was_training = self.training
        self.train()
        for _ in range(steps):
            x, y, t, z = self.replay(self.hparams.replay_batch_size)
            out = self(x)
            loss = self.criterion(self.mask_logits(out, t), y)
            if self.hparams.fpf_alpha:
                loss = loss + self.hparams.fpf_alpha * F.mse_loss(out, z)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"FPF diverged (loss {loss.item()}) on modules {self.forgetting_prone_modules()}: "
                                         f"fpf_lr={self.hparams.fpf_lr} is too large for them; lower it")
            if sharded:  # FSDP2: backward fills the shards' .grad (adding to one already there), averaged over ranks
                for p in shards:
                    p.grad = None
                loss.backward()
                grads = [p.grad for p in params]
                for p in shards:
                    p.grad = None
            else:
                grads = list(torch.autograd.grad(loss, params))
                _all_reduce_mean(grads)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(self.hparams.fpf_lr * g)
        for p, g in zip(shards, kept):
            p.grad = g
        _all_reduce_mean([b for b in self.buffers() if b.is_floating_point()])  # e.g. BatchNorm statistics
        self.train(was_training)

    # -- checkpointing ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        shares = None
        if self.buffer is not None:  # every rank's share (this hook runs on every rank)
            shares = gather_object(self.buffer.state_dict()) if self._saved_shares is None else self._saved_shares
        checkpoint["continual"] = {
            "tasks_finished": self.tasks_finished, "acc_matrix": self.acc_matrix, "drift": dict(self.drift),
            "anchor": {n: p.cpu() for n, p in self.anchor.items()}, "buffer_shares": shares,
        }
        if sharding.is_sharded(self):  # parameters without optimizer state yet: a distributed checkpoint needs one
            sharding.fill_optimizer_states(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The stream's state; the buffer shares wait for the run's ranks (restored when training starts)."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("continual")
        if state is None:
            return
        self.tasks_finished, self.acc_matrix, self.drift = state["tasks_finished"], state["acc_matrix"], dict(state["drift"])
        self.anchor = {n: p.to(self.device) for n, p in state["anchor"].items()}
        self._saved_shares = state["buffer_shares"] or None

    def _restore_buffer(self, shares: list[dict[str, Any]]) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if len(shares) != world:
            raise ValueError(f"the checkpoint holds {len(shares)} buffer shares (one per rank) but this run has {world} ranks; "
                             f"resume with {len(shares)} processes")
        self.buffer = ReplayBuffer(self.buffer.total_capacity, self.buffer.policy, self.buffer.seed)
        self.buffer.set_share(world, rank)
        self.buffer.load_state_dict(shares[rank])
