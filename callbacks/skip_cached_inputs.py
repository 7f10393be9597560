"""Stop loading the inputs whose frozen-prefix outputs SubTuning has cached: later epochs load no images.

After each training (and validation) epoch it asks the module which samples of each loader's dataset are cached
(:meth:`zoo.subtuning.FrozenPrefix.cached_rows`) and tells the dataset (``LabeledSubset.skip_cached``): those
samples come back with a zero placeholder as input, and the module reads their features from its cache. At the
end of the run every input loads again. Persistent DataLoader workers keep the setting they started with (they
keep loading). A continual stream's task datasets always load their inputs (the replay buffer stores them).

YAML (with ``cache_frozen_features: true`` on the module)::

    trainer:
      callbacks:
        - class_path: callbacks.skip_cached_inputs.SkipCachedInputs
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SkipCachedInputs(Callback):
    """See the module docstring."""

    def __init__(self):
        self.skipping: list[Any] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not getattr(pl_module, "cache_frozen_features", False) or not callable(getattr(pl_module, "cached_rows", None)):
            raise ValueError(f"SkipCachedInputs skips inputs whose features the module cached, but {type(pl_module).__name__} caches none: "
                             "set cache_frozen_features: true on zoo.subtuning.SubTuningModule (or on its zoo.subtuning.Freeze surgery)")

    def _skip(self, pl_module: LightningModule, loaders: Any) -> None:
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            dataset = getattr(loader, "dataset", None)
            rows = pl_module.cached_rows(dataset) if callable(getattr(dataset, "skip_cached", None)) else None
            if rows is not None:
                dataset.skip_cached(*rows)
                if all(d is not dataset for d in self.skipping):
                    self.skipping.append(dataset)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._skip(pl_module, trainer.train_dataloader)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._skip(pl_module, trainer.val_dataloaders)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Every input loads again."""
        for dataset in self.skipping:
            dataset.skip_cached(None)
        self.skipping.clear()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
