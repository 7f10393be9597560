"""The base LightningModule of the zoo: a backbone, a linear head, and the training loop.

Every technique subclasses :class:`Classifier`. Optimizer and LR scheduler come from YAML
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

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.backbones import build_backbone


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy, and top-5 where there are more than 5 classes."""
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


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
    """Backbone + linear head trained with cross-entropy; top-1/top-5 accuracy per split.

    Args:
        model: a model name (see :mod:`zoo.backbones`): ``timm/...``, ``hf/...``, ``pypi/...``,
            ``zoo/...`` or a zoo ``.ckpt``. ``None`` leaves ``backbone``/``head`` to a subclass.
        num_classes: classes of the head (linked from the datamodule by the CLI).
        pretrained: load the model's pretrained weights.
        model_kwargs: extra arguments for the model (e.g. timm's ``img_size``, ``depth``).
        optimizer: called with the parameter groups (no weight decay on norms and biases).
        lr_scheduler: called with the optimizer; stepped every ``scheduler_interval``.
        scheduler_interval: ``epoch`` or ``step``.
        label_smoothing: for the cross-entropy.

    Subclass it to make a new method; ``training_step`` calls :meth:`training_loss`, which is the
    one method most techniques override.
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
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}: expected 'epoch' or 'step'")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.num_classes = num_classes
        if model is not None:
            self.backbone = build_backbone(model, pretrained, **(model_kwargs or {}))
            self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = accuracy_metrics(num_classes, "train/")
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.backbone(x))

    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, targets, ...)`` -> ``(inputs, targets)``; extra items (e.g. indices) are ignored."""
        return batch[0], batch[1]

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits, targets)`` for a training batch."""
        x, y = self.unpack_batch(batch)
        logits = self(x)
        return self.criterion(logits, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.train_metrics.update(logits.detach(), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, metrics: MetricCollection, split: str, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Loss and metrics of an evaluation batch; ``logits`` when the caller computed them already."""
        x, y = self.unpack_batch(batch)
        logits = self(x) if logits is None else logits
        loss = self.criterion(logits, y)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", on_epoch=True, sync_dist=True, batch_size=len(y))
        metrics.update(logits, y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(self.unpack_batch(batch)[0]).softmax(-1)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay beyond norms and biases (timm's own list)."""
        backbone = getattr(self, "backbone", None)
        fn = getattr(backbone, "no_weight_decay", None)
        return set(fn()) if callable(fn) else set()

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
