"""SubTuning's finetuning profile as a callback: profile the candidate layers and pick ``trainable_layers``
greedily before ``zoo fit`` trains (Kaplun et al., 2023, Sec. 2-3; the parts are in :mod:`zoo.subtuning.profile`).

    zoo fit --config configs/subtuning/profile.yaml

It writes ``profile.csv``, ``greedy.csv``, ``profile.png`` (also in TensorBoard under ``subtuning/profile``) and
``trainable_layers.yaml``, a snippet that ``zoo fit`` accepts::

    zoo fit --config configs/subtuning/lite0_fmnist.yaml --config <out_dir>/trainable_layers.yaml
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from zoo.subtuning.cache import cache_placement
from zoo.subtuning.module import SubTuningModule
from zoo.subtuning.profile import STARTS, ProfileRunner, profile_figure, stack_dataset, write_outputs
from zoo.subtuning.recipe import ScoringRecipe


class SubTuningProfile(Callback):
    """Profile the candidate layers and pick ``trainable_layers`` greedily before training starts.

    On ``setup`` (rank 0, result broadcast), it scores every layer of the module's pretrained
    backbone on the datamodule's ``train_set``/``val_set``, runs the greedy selection, writes the
    outputs (see :func:`write_outputs`) to ``out_dir`` (default: the logger's directory) and a
    TensorBoard figure, then sets the module's ``trainable_layers`` to the chosen ones. The runs
    use a copy of the backbone on the trainer's root device. ``start: both`` is the official
    greedy start (see :func:`zoo.subtuning.profile.greedy_select`).
    Under ``fast_dev_run`` each run trains for one step on a few samples, scored on the validation split.

    Args:
        recipe: how each candidate is trained and scored (:class:`zoo.subtuning.recipe.ScoringRecipe`):
            ``official`` (default; 10 epochs, AdamW lr 1e-4, wd 5e-5, per-epoch cosine, batch 256, 5-fold
            cross-validation on the training set), ``fast`` (100 AdamW steps, lr 1e-3, batch 32, constant LR,
            scored on the validation set) or a mapping of fields.
        steps, epochs, batch_size, lr, weight_decay, folds: override that field of ``recipe`` when set
            (``steps`` replaces the epochs).
        k: the largest number of layers chosen (the smallest with ``start: all``); default 3, this zoo's cap:
            the official search has none (``k: null``) and stops only by ``epsilon``.
        epsilon, start: see :func:`zoo.subtuning.profile.greedy_select`.
        cache_device: where the frozen prefix's outputs are kept (:func:`zoo.subtuning.cache.cache_placement`): ``auto``
            (on the trainer's device unless larger than 1 GiB, then CPU memory), ``cpu`` (pinned when training on a GPU)
            or a device name.

    YAML::

        trainer:
          callbacks:
            - class_path: callbacks.subtuning_profile.SubTuningProfile
              init_args: {recipe: official, k: 3, epsilon: 0.01, start: both}
              # recipe: fast, or recipe: {epochs: 5, lr: 0.0003, schedule: cosine, folds: 1}
    """

    def __init__(
        self,
        recipe: ScoringRecipe | str = "official",
        steps: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        k: int | None = 3,
        epsilon: float = 0.01,
        start: str = "both",
        folds: int | None = None,
        max_val_samples: int | None = 1000,
        seed: int = 0,
        out_dir: str | None = None,
        cache_device: str | None = "auto",
    ):
        if start not in STARTS:
            raise ValueError(f"start={start!r}: expected one of {', '.join(map(repr, STARTS))}")
        if (k is not None and k < 1) or epsilon < 0:
            raise ValueError(f"k={k}, epsilon={epsilon}: expected a positive k (or null) and epsilon >= 0")
        self.recipe = ScoringRecipe.of(recipe, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, folds=folds)
        self.seed = seed
        self.k, self.epsilon, self.start = k, epsilon, start
        self.max_val_samples, self.out_dir = max_val_samples, out_dir
        cache_placement(cache_device, "cpu")  # a bad name fails here, before training
        self.cache_device = cache_device
        self.chosen: list[str] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.chosen is not None:
            return
        if trainer.ckpt_path:  # resuming: reuse the selection stored in the checkpoint
            ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=False)
            self.chosen = ckpt.get("callbacks", {}).get(self.state_key, {}).get("chosen")
            if self.chosen is not None:
                pl_module.set_trainable_layers(self.chosen)
                return
        if not isinstance(pl_module, SubTuningModule):
            raise ValueError(f"SubTuningProfile needs a zoo.subtuning.SubTuningModule, got {type(pl_module).__name__}")
        dm = trainer.datamodule
        if dm is None or getattr(dm, "train_set", None) is None or getattr(dm, "val_set", None) is None:
            raise ValueError("SubTuningProfile needs a zoo datamodule with train_set and val_set")
        chosen = None
        if trainer.is_global_zero:
            chosen = self.run(trainer, pl_module, dm)
        self.chosen = trainer.strategy.broadcast(chosen, src=0)
        pl_module.set_trainable_layers(self.chosen)

    def run(self, trainer, pl_module: SubTuningModule, dm) -> list[str]:
        recipe, max_val = self.recipe, self.max_val_samples
        limit = None
        if trainer.fast_dev_run:
            recipe, limit, max_val = dataclasses.replace(recipe, steps=1, folds=1), 4 * dm.num_classes, 16
        train = stack_dataset(dm.train_set, limit, self.seed)
        # A smoke test (fast_dev_run) on a tiny stand-in dataset may have no validation images.
        val = stack_dataset(dm.val_set if len(dm.val_set) or not trainer.fast_dev_run else dm.train_set, max_val, self.seed)
        # On the trainer's device (in ``setup`` the module itself is not moved there yet).
        backbone = copy.deepcopy(pl_module.backbone).to(trainer.strategy.root_device)
        runner = ProfileRunner(backbone, pl_module.num_classes, train, val, granularity=pl_module.hparams.granularity, recipe=recipe, seed=self.seed,
                                cache_device=self.cache_device)
        chosen, best, history = runner.select(self.k, self.epsilon, self.start)
        profile = runner.profile()
        out_dir = self.out_dir or (trainer.logger.log_dir if trainer.logger is not None and trainer.logger.log_dir else trainer.default_root_dir)
        write_outputs(Path(out_dir) / "subtuning_profile", profile, history, chosen, best, pl_module.hparams.granularity)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("subtuning/profile", profile_figure(profile, chosen))
        return list(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen = state_dict.get("chosen")
