""":class:`SubTuningModule`: a :class:`zoo.Classifier` preset with the surgery ``[Freeze(...)]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from zoo.classifier import Classifier
from zoo.losses import LossTerm
from zoo.subtuning.layers import GRANULARITIES, Freeze, resolve_layers
from zoo.subtuning.prefix import FrozenPrefix
from zoo.surgery import Surgery


class SubTuningModule(FrozenPrefix, Classifier):
    """A classifier that finetunes only ``trainable_layers`` of its backbone (and its new head).

    The same as ``zoo.Classifier`` with ``surgery: [zoo.subtuning.Freeze]``: the frozen prefix (everything
    before the first trainable layer) runs under ``torch.no_grad`` and the frozen part of the backbone stays
    in eval mode, so BatchNorm statistics never move (see :class:`~zoo.subtuning.prefix.FrozenPrefix`).

    Args:
        trainable_layers: layer names from :func:`~zoo.subtuning.candidate_layers` or indices into it; empty
            or ``null`` trains the head alone (a linear probe).
        granularity: ``block`` or ``stage`` (ResNet stages ``layerX``, EfficientNet stages ``blocks.i``).
        cache_frozen_features: compute the frozen prefix's output once per training and validation sample
            (keyed by the batch's ``index``) and reuse it in later epochs. Needs ``with_index: true`` on the
            datamodule and a deterministic training transform (``augment: false``). Holds the prefix outputs of
            both splits in memory, one cache per dataset (new data starts a new one). List the callback
            ``callbacks.skip_cached_inputs.SkipCachedInputs`` to also stop loading the cached samples' inputs.
        checkpoint_feature_cache: save the cache's filled rows in checkpoints (each rank's rows under DDP,
            gathered to rank 0), so that a run resumed by ``fit`` reuses them and trains bit for bit like an
            uninterrupted one (recomputed features can differ in their lowest bits). Each checkpoint grows by
            the prefix outputs of every cached sample; ``false`` keeps checkpoints small and the cache refills.
        surgery: more transforms, applied after the ``Freeze`` (e.g. ``zoo.emoe.Moefy``: parameters it makes
            inside frozen layers stay frozen).
        losses: the loss terms (default: cross-entropy).
        (other args: see :class:`zoo.classifier.Classifier`)

    YAML::

        model:
          class_path: zoo.subtuning.SubTuningModule
          init_args:
            model: pypi/efficientnet_lite0
            pretrained: true
            granularity: stage
            trainable_layers: [blocks.5, blocks.6]   # or indices: [5, 6]
            cache_frozen_features: true               # needs data.init_args.with_index: true
    """

    def __init__(
        self,
        model: str,
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        trainable_layers: list[str | int] | None = None,
        granularity: str = "block",
        cache_frozen_features: bool = False,
        checkpoint_feature_cache: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        surgery: list[Surgery] | None = None,
        losses: list[LossTerm] | None = None,
    ):
        if not isinstance(model, str):
            raise ValueError(f"model={model!r}: SubTuningModule needs a model name (see zoo.backbones)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
        if any(_is_freeze(t) for t in surgery or []):
            raise ValueError("SubTuningModule makes its own zoo.subtuning.Freeze from trainable_layers and granularity: "
                             "leave Freeze out of `surgery` (or use zoo.Classifier with the whole surgery list)")
        freeze = Freeze(trainable_layers, granularity, cache_frozen_features, checkpoint_feature_cache)
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, label_smoothing=label_smoothing,
                         surgery=[freeze, *(surgery or [])], losses=losses)
        freeze.trainable_layers = resolve_layers(self.backbone, trainable_layers, granularity)  # bad names fail here
        self.hparams["surgery"] = [t.config() for t in self.surgery[1:]]
        self.configure_model()  # freeze now: the module is ready to train (or to prune) as built
        self.hparams.trainable_layers = list(self.trainable_names)

    def set_trainable_layers(self, trainable_layers: Sequence[str | int] | None) -> None:
        """(Re)choose the finetuned layers, e.g. from a finetuning profile, before training starts."""
        super().set_trainable_layers(trainable_layers)
        self.hparams.trainable_layers = list(self.trainable_names)


def _is_freeze(spec: Any) -> bool:
    if isinstance(spec, dict):
        return str(spec.get("class_path", "")).rsplit(".", 1)[-1] == "Freeze"
    return isinstance(spec, Freeze)
