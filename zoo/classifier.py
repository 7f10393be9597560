"""The base LightningModule of the zoo: a backbone, a linear head, and the training loop.

A module is built from parts (see the README's "How the parts fit"): a backbone named by ``model``, an
ordered list of ``surgery`` transforms (:mod:`zoo.surgery`) applied to it in ``configure_model``, and
``losses`` (:mod:`zoo.losses`) summed into the objective. Callbacks do what happens between steps.
Every technique's module is a preset of these parts. Optimizer and LR scheduler come from YAML
the LightningCLI way::

    model:
      class_path: zoo.Classifier
      init_args:
        model: timm/vit_tiny_patch16_224
        model_kwargs: {img_size: 8, patch_size: 2, in_chans: 1}
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {lr: 0.001, weight_decay: 0.05}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.CosineAnnealingLR
          init_args: {T_max: 30}
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from zoo import epoch_state, reshard
from zoo import losses as L
from zoo import sharding
from zoo import surgery as S
from zoo.backbones import build_backbone
from zoo.batch import Batch, as_batch, to_device
from zoo.metrics import accuracy_metrics


HIT_BATCH_ELEMENTS = 2**18  # Classifier.count_hits counts kept batches together once they hold this many logits


@dataclass
class KeptBatches:
    """The batches :meth:`Classifier.count_hits` holds for one metric collection, and how many logits they hold."""

    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    elements: int = 0


def param_groups(module: nn.Module, skip: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with weight decay, and without (norms, biases, ``skip``)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class Classifier(LightningModule):
    """Backbone + linear head trained on a sum of loss terms; top-1/top-5 accuracy per split.

    Args:
        model: a model name (see :mod:`zoo.backbones`): ``timm/...``, ``hf/...``, ``pypi/...``,
            ``zoo/...`` or a zoo ``.ckpt``. ``None`` leaves ``backbone``/``head`` to a subclass.
        num_classes: classes of the head (linked from the datamodule by the CLI).
        pretrained: load the model's pretrained weights.
        model_kwargs: extra arguments for the model (e.g. timm's ``img_size``, ``depth``).
        optimizer: called with the parameter groups (no weight decay on norms and biases).
        lr_scheduler: called with the optimizer; stepped every ``scheduler_interval``.
        scheduler_interval: ``epoch`` or ``step``.
        label_smoothing: of the default cross-entropy term (and of the evaluation loss).
        surgery: transforms applied in order to the backbone in ``configure_model`` (:mod:`zoo.surgery`).
        losses: the loss terms (:mod:`zoo.losses`); default one :class:`~zoo.losses.CrossEntropy`.
        log_every_step: log the step loss (``train/loss_step``, progress bar) at every training step. Default
            off: at the trainer's ``log_every_n_steps`` only (the steps the logger writes anyway). Either way the
            epoch values (``train/loss_epoch``, ``train/<term>``, ``train/acc``, ``val/*``, ``test/*``) are
            accumulated on the device without a host sync and logged once at epoch end, the same values as
            per-step ``self.log`` (issue 17, cheap logging), over every rank's samples. A callback's own ``on_*_epoch_end`` runs before the
            module's, so it sees them from the next hook on (ModelCheckpoint, EarlyStopping run after the module).

    Subclass it to make a new method: override :meth:`batch_logits` (how a batch becomes logits),
    add a loss term, or override :meth:`training_loss` for anything else.
    """

    def __init__(
        self,
        model: str | None = "zoo/convnet",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        surgery: list[S.Surgery] | None = None,
        losses: list[L.LossTerm] | None = None,
        log_every_step: bool = False,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}: expected 'epoch' or 'step'")
        if losses is not None and not losses:
            raise ValueError("losses=[]: give at least one loss term (or null for cross-entropy)")
        if losses is not None and label_smoothing:
            raise ValueError(f"label_smoothing={label_smoothing} sets the default cross-entropy; with `losses` given, "
                             "set it on zoo.losses.CrossEntropy instead")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "surgery", "losses"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.num_classes = num_classes
        if model is not None:
            self.backbone = build_backbone(model, pretrained, **(model_kwargs or {}))
            self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.surgery = [S.instantiate(t) for t in surgery or []]
        terms = [L.instantiate(t) for t in losses] if losses is not None else [L.CrossEntropy(label_smoothing=label_smoothing)]
        L.unique_names(terms)
        self.losses = nn.ModuleList(terms)
        # plain data, so checkpoints load with weights_only and rebuild the same parts; a preset whose signature
        # lacks `surgery`/`losses` makes them from its own arguments, which are its hyperparameters (resume, load)
        own = inspect.signature(type(self).__init__).parameters
        parts = {"surgery": [t.config() for t in self.surgery], "losses": None if losses is None else [t.config() for t in terms]}
        for key, value in parts.items():
            if key in own:
                self.hparams[key] = value
            else:
                self.hparams.pop(key, None)
        self.surgery_applied = False
        self.sharded = False  # fully_shard applied (zoo.sharding)
        self.train_metrics = accuracy_metrics(num_classes, "train/")
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        self.log_every_step = log_every_step
        self.epoch_sums: dict[str, list] = {}  # train/<name> -> [sum of value * batch size (device tensor), samples]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Two technique presets do not combine by inheritance (each builds its own parts from its own arguments,
        so one's arguments would be dropped): fail at the class statement, pointing at the parts."""
        super().__init_subclass__(**kwargs)
        presets = [b for b in cls.__mro__[1:] if issubclass(b, Classifier) and b is not Classifier and "__init__" in vars(b)]
        leaves = [p for p in presets if not any(q is not p and issubclass(q, p) for q in presets)]
        if len(leaves) > 1:
            names = " and ".join(b.__name__ for b in cls.__bases__ if issubclass(b, Classifier))
            raise TypeError(
                f"{cls.__name__} inherits from the presets {names}: presets do not mix by inheritance (the arguments of "
                f"one would be lost). Compose parts instead: one module with `surgery:` and `losses:` lists and callbacks "
                f"(README, 'How the parts fit'; examples in configs/compose/), or subclass one preset and add parts."
            )

    # -- the parts ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Apply ``surgery`` to the backbone, then :meth:`after_surgery`, then shard when the strategy gives a device
        mesh (:mod:`zoo.sharding`), once (Lightning calls this before training and before loading a checkpoint, so a
        resumed run has the same structure). Presets extend :meth:`after_surgery`, not this."""
        if not self.surgery_applied:
            if self.surgery:
                if getattr(self, "backbone", None) is None:
                    raise ValueError(f"{type(self).__name__} has no `backbone` for surgery {self.surgery}")
                self.backbone = S.apply_all(self.backbone, self.surgery)
            self.surgery_applied = True
            self.after_surgery()
        mesh = self.device_mesh
        if mesh is not None and not self.sharded:
            sharding.shard(self, mesh, self.shard_units())
            self.sharded = True

    def after_surgery(self) -> None:
        """What a preset builds on the final structure (before sharding): SN-Net's sampler, SubTuning's layer chain."""

    def shard_units(self) -> list[nn.Module] | None:
        """The modules sharded one by one, inner first (default: the backbone's blocks by family, see
        :func:`zoo.sharding.block_units`); every top-level part with parameters is a unit after them."""
        return None

    def unload_surgery(self) -> nn.Module:
        """Undo the surgery (reverse order): the backbone becomes a plain model again, and is returned."""
        if self.surgery_applied and self.surgery:
            self.backbone = S.undo_all(self.backbone, self.surgery)
        self.surgery_applied = False
        return self.backbone

    def add_loss(self, term: L.LossTerm) -> None:
        """Add a loss term (a preset's own terms); its name is made unique."""
        terms = [*self.losses, term]
        L.unique_names(terms)
        self.losses.append(term)

    def loss_term(self, cls: type) -> L.LossTerm | None:
        """The first loss term of type ``cls``, or None."""
        return next((t for t in self.losses if isinstance(t, cls)), None)

    def setup(self, stage: str) -> None:
        sharding.check_strategy(self, self.trainer.strategy, [*self.surgery, *self.losses, *self.trainer.callbacks])
        for term in self.losses:
            term.setup(self, stage)

    # -- steps ---------------------------------------------------------------------------------------------------
    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.backbone(x))

    def batch_logits(self, batch: Batch) -> torch.Tensor:
        """The logits of a batch (training and evaluation); presets override this (e.g. SN-Net's sampled stitch)."""
        return self(batch.inputs)

    def mask_logits(self, logits: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Logits as the loss and the metrics see them (identity; task-incremental streams mask other tasks)."""
        return logits

    def forward_step(self, batch: Batch) -> L.Step:
        """The step the terms see: one forward over the batch and the samples terms join to it
        (:meth:`~zoo.losses.LossTerm.join`), the logits split back (``step.logits``: the batch's only)."""
        joins = [(t.name, s) for t in self.losses if (s := t.join(self, batch)) is not None]
        if not joins:
            return L.Step(self, batch, self.batch_logits(batch))
        parts = [batch, *(s for _, s in joins)]
        logits = self.batch_logits(Batch(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts])))
        logits = logits.split([len(p) for p in parts])
        return L.Step(self, batch, logits[0], joined={name: (s, z) for (name, s), z in zip(joins, logits[1:])})

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total loss, logits, targets)``: the weighted sum of the loss terms, each logged as ``train/<name>``."""
        step = self.forward_step(batch)
        values = {}
        for term in self.losses:
            term.check_batch(batch)
            values[term.name] = term(step)
        total = None  # sum(weight * value), without the multiplications by 1 and the initial 0 + (two ops a step)
        for term in self.losses:
            value = values[term.name] if term.weight == 1 else term.weight * values[term.name]
            total = value if total is None else total + value
        for term in self.losses:
            term.after_step(step)
        if len(values) > 1:
            for name, value in values.items():
                self.accumulate(f"train/{name}", value, len(batch))
        return total, self.mask_logits(step.logits, batch.task), batch.targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self.training_loss(as_batch(batch))
        self.accumulate("train/loss", loss, len(y))
        every = self.trainer.log_every_n_steps  # the steps whose step values the logger writes (0: none)
        if self.log_every_step or (every and (self.global_step + 1) % every == 0) or self.trainer.should_stop:
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
            self.log("train/loss", loss, logger=False, on_step=True, on_epoch=False, batch_size=len(y))
        self.count_hits(self.train_metrics, logits.detach(), y)
        return loss

    def count_hits(self, metrics: MetricCollection, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep this batch (a reference, no copy) for :meth:`flush_hits`, which counts the hits of every accuracy in
        ``metrics`` over the kept batches at once: at epoch end, or here once they hold ``HIT_BATCH_ELEMENTS`` logits.
        The same values as ``metrics.update`` per step, at a fraction of its cost (issue 17)."""
        kept = self.__dict__.setdefault("hit_batches", {}).setdefault(id(metrics), KeptBatches())
        kept.batches.append((logits, targets))
        kept.elements += logits.numel()
        if kept.elements >= HIT_BATCH_ELEMENTS:
            self.flush_hits(metrics)

    def flush_hits(self, metrics: MetricCollection) -> bool:
        """Update ``metrics`` with the hits of the batches kept by :meth:`count_hits` (integer counts: the same as batch
        by batch); whether the metrics were updated at all."""
        kept = self.__dict__.setdefault("hit_batches", {}).pop(id(metrics), KeptBatches()).batches
        if kept:
            logits, targets = kept[0] if len(kept) == 1 else (torch.cat(parts) for parts in zip(*kept))
            for metric in metrics.values():
                metric.update(counts=(metric.hits(logits, targets), len(targets)))
        return any(m.update_count for m in metrics.values())

    def accumulate(self, key: str, value: torch.Tensor, batch_size: int) -> None:
        """Add a step value to its epoch mean (weighted by the batch size, as ``self.log(on_epoch=True)``
        does), kept on the device: no host sync per step; :meth:`on_train_epoch_end` logs it."""
        value = value.detach()
        value = value if value.dtype in (torch.float32, torch.float64) else value.to(torch.get_default_dtype())
        total = self.epoch_sums.get(key)
        if total is None:  # (not setdefault: its default would be a new tensor every step)
            total = self.epoch_sums[key] = [torch.zeros((), device=value.device), 0]
        total[0] = total[0] + value * batch_size
        total[1] += batch_size

    def epoch_mean(self, key: str) -> torch.Tensor:
        """The mean of the values :meth:`accumulate` added to ``key`` on every rank (each sample counted once), and
        start anew. A collective under several processes: every rank calls it, for the same keys in the same order."""
        total, n = self.epoch_sums.pop(key)
        n = torch.tensor(float(n), dtype=total.dtype, device=total.device)
        if self.trainer.world_size > 1:
            total, n = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in (total, n))
        return total / n

    def on_train_epoch_end(self) -> None:
        """Log the epoch means over every rank's samples (``train/loss_epoch`` and ``train/loss`` for callbacks,
        ``train/<term>``) and the training metrics (computed over the epoch and reset by Lightning), then start the
        next epoch's sums. (``sync_dist``: the means are the same on every rank already.)"""
        for key in sorted(k for k in self.epoch_sums if k.startswith("train/")):
            mean = self.epoch_mean(key)
            if key == "train/loss":
                self.log("train/loss_epoch", mean, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
                self.log(key, mean, logger=False, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
            else:
                self.log(key, mean, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        if self.flush_hits(self.train_metrics):
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)

    def _eval_step(self, batch: Any, metrics: MetricCollection, split: str) -> torch.Tensor:
        batch = as_batch(batch)
        logits = self.mask_logits(self.batch_logits(batch), batch.task)
        loss = self.criterion(logits, batch.targets)
        if len(self.trainer.num_val_batches if split == "val" else self.trainer.num_test_batches) > 1:  # keys per loader
            metrics.update(logits, batch.targets)
            self.log(f"{split}/loss", loss, prog_bar=split == "val", on_epoch=True, sync_dist=True, batch_size=len(batch))
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")
        else:
            self.count_hits(metrics, logits, batch.targets)
            self.accumulate(f"{split}/loss", loss, len(batch))
        return loss

    def log_eval_epoch(self, split: str, metrics: MetricCollection) -> None:
        """Log ``<split>/loss`` (the mean over the split, summed over ranks) and the split's metrics, once."""
        if f"{split}/loss" not in self.epoch_sums:
            return
        mean = self.epoch_mean(f"{split}/loss")
        self.log(f"{split}/loss", mean, prog_bar=split == "val", on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        self.flush_hits(metrics)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")

    def on_validation_epoch_end(self) -> None:
        self.log_eval_epoch("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_eval_epoch("test", self.test_metrics)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = as_batch(batch)
        return self.mask_logits(self.batch_logits(batch), batch.task).softmax(-1)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A :class:`~zoo.batch.Batch` field by field (:func:`zoo.batch.to_device`, faster than Lightning's generic
        walk); anything else as Lightning moves it."""
        if not isinstance(batch, Batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return to_device(batch, device)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay beyond norms and biases: what any submodule declares with its
        own ``no_weight_decay()`` (timm's position embeddings, EMoE's stacked expert biases after surgery)."""
        names: set[str] = set()
        for module in self.modules():
            fn = getattr(module, "no_weight_decay", None)
            if module is not self and callable(fn):
                names |= set(fn())
        return names

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(param_groups(self, self.no_weight_decay()))
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config = {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets zoo.backbones.load_zoo_module rebuild any zoo module from its checkpoint alone.
        checkpoint["zoo_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.sharded:  # parameters without a gradient yet have no optimizer state, which a sharded resume needs
            sharding.fill_optimizer_states(checkpoint, self)
        elif checkpoint.get("optimizer_states"):  # by parameter name: the file also resumes sharded (zoo.reshard)
            reshard.name_optimizer_states(checkpoint, self, self.trainer.optimizers)
        epoch_state.save(self, checkpoint)  # the running train/* sums and accuracy counters of the epoch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        epoch_state.load(self, checkpoint)

    def on_train_start(self) -> None:
        """A run resumed mid-epoch takes up the epoch's running values (:mod:`zoo.epoch_state`): it logs the epoch
        means of a run never interrupted."""
        epoch_state.restore(self)

