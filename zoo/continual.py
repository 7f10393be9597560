"""Continual learning on a task stream: fine-tuning, joint training, ER, DER/DER++, FPF and k-FPF.

Every method is a :class:`~zoo.classifier.Classifier` trained on a
:class:`~datamodules.continual.ContinualDataModule`; one ``zoo fit`` runs the whole stream (epoch ``e`` trains
task ``e // epochs_per_task``). When a task ends the module measures how far each module drifted, runs FPF if
asked, tests every task seen so far (a row of the accuracy matrix) and calls ``on_task_end`` of the callbacks
(e.g. :class:`callbacks.continual_metrics.ContinualMetrics`). Task ends are handled at the start of the next
task's first epoch (and at the end of training), so any end-of-epoch checkpoint resumes exactly.

    model:
      class_path: zoo.continual.DERpp
      init_args: {model: zoo/mlp, buffer_size: 500, alpha: 0.1, beta: 0.5}

Methods: :class:`FineTune` (lower bound), :class:`Joint` (upper bound), :class:`ER` (Chaudhry et al. 2019),
:class:`DER` and :class:`DERpp` (Buzzega et al., NeurIPS 2020), FPF (``fpf_steps`` on any method) and
:class:`KFPF` (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader

from datamodules.continual import ContinualDataModule
from zoo.classifier import Classifier
from zoo.replay_buffer import ReplayBuffer
from zoo.resume import gather_object


def module_drift(model: nn.Module, anchor: dict[str, torch.Tensor]) -> dict[str, float]:
    """(1/|θ|)·‖θ − θ_anchor‖₁ of every module that owns parameters (Zhao et al. 2023, Sec. 3)."""
    drift = {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(prefix=name, recurse=False))
        if params:
            numel = sum(p.numel() for _, p in params)
            drift[name] = sum((p.detach() - anchor[n].to(p.device)).abs().sum().item() for n, p in params) / numel
    return drift


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor /= dist.get_world_size()


class ContinualClassifier(Classifier):
    """Sequential training on the stream: plain fine-tuning, and the base of every replay method.

    Args (beyond :class:`Classifier`'s):
        buffer_size: samples in the replay memory over all ranks (0: none).
        buffer_policy: ``reservoir`` or ``balanced`` (see :mod:`zoo.replay_buffer`).
        replay_batch_size: samples drawn from the buffer per replay term.
        fpf_steps: at each task end, finetune the forgetting-prone modules this many SGD steps on the buffer (FPF).
        fpf_lr: learning rate of FPF.
        fpf_alpha: weight of the logit-matching (MSE to stored logits) term of FPF (0: cross-entropy only).
        fpf_modules: names (or class names, e.g. ``BatchNorm2d``) of the forgetting-prone modules; ``null``:
            the ``fpf_num_modules`` modules with the largest measured drift.
        fpf_num_modules: how many modules FPF picks by drift.
        seed: seed of the buffer's random stream.
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
    ):
        super().__init__(model, num_classes, pretrained, model_kwargs, optimizer, lr_scheduler, scheduler_interval, label_smoothing)
        name = type(self).__name__
        if buffer_size < 0 or (buffer_size == 0 and (self.replays or fpf_steps > 0)):
            need = "replays from a buffer" if self.replays else f"runs FPF (fpf_steps={fpf_steps}) on the buffer"
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

    def mask(self, logits: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Task-incremental: logits outside the task's classes are pushed to the minimum."""
        if task is None or self.stream is None or self.stream.scenario != "task":
            return logits
        return logits.masked_fill(~self.task_mask[task], torch.finfo(logits.dtype).min)

    def replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` buffer samples, transformed for training: ``(x, y, task, stored_logits)``."""
        x, y, t, z = self.buffer.sample(n)
        return self.stream.buffer_transform(x), y, t, z

    def replay_loss(self) -> torch.Tensor:
        """The replay term added to the current batch's cross-entropy (none for fine-tuning)."""
        return torch.zeros((), device=self.device)

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, t, raw = batch
        out = self(x)
        can_replay = self.buffer is not None and len(self.buffer) > 0
        loss = self.criterion(self.mask(out, t), y) + (self.replay_loss() if can_replay else 0.0)
        if self.buffer is not None:  # reservoir sampling sees the examples before augmentation
            self.buffer.add(raw, y, t, out.detach())
        return loss, out, y

    def _eval_step(self, batch: Any, metrics, split: str) -> torch.Tensor:
        x, y = self.unpack_batch(batch)
        logits = self.mask(self(x), batch[2] if len(batch) > 2 else None)
        loss = self.criterion(logits, y)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", on_epoch=True, sync_dist=True, batch_size=len(y))
        metrics.update(logits, y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    # -- task ends ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.buffer is not None:
            self.buffer.to(self.device)

    def on_train_epoch_start(self) -> None:
        if not self.anchor:
            self.anchor = {n: p.detach().clone() for n, p in self.named_parameters()}
        self._finish_tasks(self.stream.task_of_epoch(self.current_epoch), final=False)

    def on_train_end(self) -> None:
        self._finish_tasks(min(math.ceil(self.current_epoch / self.stream.epochs_per_task), self.stream.num_tasks), final=True)

    def _finish_tasks(self, until: int, final: bool) -> None:
        while self.tasks_finished < until:
            t = self.tasks_finished
            self.end_of_task(t)
            self.acc_matrix[t, :t + 1] = torch.tensor([self.evaluate_task(j) for j in range(t + 1)])
            self.tasks_finished += 1
            for callback in self.trainer.callbacks:
                if callable(getattr(callback, "on_task_end", None)):
                    callback.on_task_end(self.trainer, self, t, final and self.tasks_finished == until)

    def end_of_task(self, task: int) -> None:
        """Measure each module's drift over the task, then FPF if ``fpf_steps``."""
        for name, d in module_drift(self, self.anchor).items():
            self.drift[name] = self.drift.get(name, 0.0) + d
        self.anchor = {n: p.detach().clone() for n, p in self.named_parameters()}
        if self.hparams.fpf_steps:
            self.fpf(self.hparams.fpf_steps)

    @torch.no_grad()
    def evaluate_task(self, task: int) -> float:
        """Test accuracy on one task of the stream (every rank sees the whole test set)."""
        loader = DataLoader(self.stream.task_set("test", task), batch_size=256)
        was_training, correct, total = self.training, 0, 0
        self.eval()
        for i, (x, y, t) in enumerate(loader):
            if self.trainer.fast_dev_run and i:
                break
            x, y, t = x.to(self.device), y.to(self.device), t.to(self.device)
            correct += (self.mask(self(x), t).argmax(-1) == y).sum().item()
            total += len(y)
        self.train(was_training)
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
        """Finetune only the forgetting-prone modules on the buffer with plain SGD (Zhao et al. 2023)."""
        modules = dict(self.named_modules())
        params = [p for n in self.forgetting_prone_modules() for p in modules[n].parameters(recurse=False)]
        was_training = self.training
        self.train()
        for _ in range(steps):
            x, y, t, z = self.replay(self.hparams.replay_batch_size)
            out = self(x)
            loss = self.criterion(self.mask(out, t), y)
            if self.hparams.fpf_alpha:
                loss = loss + self.hparams.fpf_alpha * F.mse_loss(out, z)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"FPF diverged (loss {loss.item()}) on modules {self.forgetting_prone_modules()}: "
                                         f"fpf_lr={self.hparams.fpf_lr} is too large for them; lower it")
            grads = list(torch.autograd.grad(loss, params))
            _all_reduce_mean(grads)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(self.hparams.fpf_lr * g)
        _all_reduce_mean([b for b in self.buffers() if b.is_floating_point()])  # e.g. BatchNorm statistics
        self.train(was_training)

    # -- checkpointing ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        shares = None
        if self.buffer is not None:  # every rank's share (this hook runs on every rank)
            shares = gather_object(self.buffer.state_dict())
        checkpoint["continual"] = {
            "tasks_finished": self.tasks_finished, "acc_matrix": self.acc_matrix, "drift": dict(self.drift),
            "anchor": {n: p.cpu() for n, p in self.anchor.items()}, "buffer_shares": shares,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("continual")
        if state is None:
            return
        self.tasks_finished, self.acc_matrix, self.drift = state["tasks_finished"], state["acc_matrix"], dict(state["drift"])
        self.anchor = {n: p.to(self.device) for n, p in state["anchor"].items()}
        shares = state["buffer_shares"]
        if self.buffer is not None and shares:
            trainer = self._trainer
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (len(shares), 0)
            if len(shares) != world:
                raise ValueError(f"the checkpoint holds {len(shares)} buffer shares (one per rank) but this run has {world} ranks; "
                                 f"resume with {len(shares)} processes")
            self.buffer = ReplayBuffer(self.buffer.total_capacity, self.buffer.policy, self.buffer.seed)
            self.buffer.set_share(world, rank)
            self.buffer.load_state_dict(shares[rank])


class FineTune(ContinualClassifier):
    """Fine-tuning on each task in turn, no replay: the lower bound of every continual method."""


class Joint(ContinualClassifier):
    """Joint training on all data seen so far (task ``t`` trains on tasks ``0..t``): the upper bound."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.stream.cumulative = True


class ER(ContinualClassifier):
    """Experience Replay (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019).

    Cross-entropy on the current batch plus cross-entropy on a reservoir-sampled buffer draw.
    """

    replays = True

    def replay_loss(self) -> torch.Tensor:
        x, y, t, _ = self.replay(self.hparams.replay_batch_size)
        return self.criterion(self.mask(self(x), t), y)


class DER(ContinualClassifier):
    """Dark Experience Replay (Buzzega et al., NeurIPS 2020): match the logits stored at insertion time.

    Args:
        alpha: weight of the MSE between current and stored logits on a buffer draw.
    """

    replays = True

    def __init__(self, *args: Any, alpha: float = 0.3, **kwargs: Any):
        super().__init__(*args, **kwargs)

    def replay_loss(self) -> torch.Tensor:
        x, _, _, z = self.replay(self.hparams.replay_batch_size)
        return self.hparams.alpha * F.mse_loss(self(x), z)


class DERpp(DER):
    """DER++ (Buzzega et al., NeurIPS 2020): DER's logit term plus β·cross-entropy on a second buffer draw.

    Args:
        alpha: weight of the logit MSE on the first draw.
        beta: weight of the cross-entropy on the second draw.
    """

    def __init__(self, *args: Any, alpha: float = 0.1, beta: float = 0.5, **kwargs: Any):
        super().__init__(*args, alpha=alpha, **kwargs)

    def replay_loss(self) -> torch.Tensor:
        logit_term = super().replay_loss()  # first draw
        x2, y2, t2, _ = self.replay(self.hparams.replay_batch_size)  # second draw
        return logit_term + self.hparams.beta * self.criterion(self.mask(self(x2), t2), y2)


class KFPF(ContinualClassifier):
    """k-FPF (Zhao et al., ICML 2023): no per-step replay; every ``fpf_every`` optimizer steps, regardless of task
    boundaries, FPF finetunes the forgetting-prone modules for ``fpf_steps`` on the buffer (k = steps / fpf_every).
    FPF also runs at each task end, where the model is evaluated (the paper's final FPF).
    ``fpf_alpha > 0`` gives k-FPF-KD (cross-entropy + ``fpf_alpha`` x MSE to the logits stored at insertion, as in
    DER++), 0 gives k-FPF-CE. FPF is plain SGD on its own (``fpf_lr``), apart from the main optimizer and its state.

    Args:
        fpf_every: optimizer steps between two FPF runs.
    """

    def __init__(self, *args: Any, fpf_every: int = 100, fpf_steps: int = 50, **kwargs: Any):
        if fpf_every < 1 or fpf_steps < 1:
            raise ValueError(f"fpf_every={fpf_every}, fpf_steps={fpf_steps}: k-FPF needs both >= 1")
        super().__init__(*args, fpf_steps=fpf_steps, **kwargs)
        self._fpf_step = -1  # the optimizer step of the last periodic FPF

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step  # unchanged over accumulated batches: FPF once per optimizer step
        if step % self.hparams.fpf_every == 0 and step != self._fpf_step:
            self._fpf_step = step
            self.fpf(self.hparams.fpf_steps)
