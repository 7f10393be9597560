"""How SubTuning scores a candidate layer set: the training recipe of each profile / greedy run.

The official code (talswisa/SubTuning, ``src/greedy_subset_selection.py``) trains every candidate with the task's
own recipe and scores it by the final validation accuracy, optionally as the mean over 5 cross-validation folds;
its greedy script (``scripts/greedy_subtuning_vit_cifar100.sh``, with ``conf/``) uses 10 epochs, AdamW at lr 1e-4,
weight decay 5e-5, a per-epoch cosine schedule, batch 256 and ``greedy_cross_val=True``. That is
:meth:`ScoringRecipe.official`. :meth:`ScoringRecipe.fast` is this zoo's cheaper budget: 100 AdamW steps at lr 1e-3,
batch 32, no schedule, scored on the validation split; its cost does not grow with the training set.

From YAML (``callbacks.subtuning_profile.SubTuningProfile``)::

    recipe: official                      # or fast
    recipe: {epochs: 5, lr: 0.0003, schedule: cosine, folds: 1}   # fields not given: the official values
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


@dataclass
class ScoringRecipe:
    """The training recipe of one scoring run (defaults: the official one).

    Args:
        epochs: passes over the training data (with ``folds``: over the other folds) per run.
        steps: a fixed number of optimizer steps instead of ``epochs`` (takes precedence when both are set).
        batch_size: samples per optimizer step (the last batch of an epoch may be smaller, as a DataLoader's).
        lr: learning rate; weight_decay: the optimizer's weight decay.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9, as the official ``LitModel``).
        schedule: ``constant``; ``cosine``: ``CosineAnnealingLR(T_max=epochs)`` stepped after every epoch (official;
            with ``steps``: ``T_max=steps``, stepped after every step); ``step``: ``StepLR(step_size=T // 3 + 1,
            gamma=0.1)`` (official ``schedule: step``).
        folds: 1 scores on the validation split; ``k >= 2`` scores the mean held-out accuracy of a k-fold
            cross-validation on the training data (a seeded shuffle cut into ``k`` near-equal folds).
    """

    epochs: int | None = 10
    steps: int | None = None
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 5e-5
    optimizer: str = "adamw"
    schedule: str = "cosine"
    folds: int = 5

    def __post_init__(self):
        if self.steps is not None and self.steps < 1 or self.steps is None and (self.epochs is None or self.epochs < 1):
            raise ValueError(f"ScoringRecipe: steps={self.steps}, epochs={self.epochs}: the budget must be positive")
        if self.batch_size < 1 or self.folds < 1 or self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"ScoringRecipe: batch_size={self.batch_size}, folds={self.folds}, lr={self.lr}, weight_decay={self.weight_decay}: "
                             "expected positive batch_size/folds and non-negative lr/weight_decay")
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ValueError(f"ScoringRecipe: optimizer={self.optimizer!r}, schedule={self.schedule!r}: expected one of {OPTIMIZERS} and {SCHEDULES}")

    @classmethod
    def official(cls) -> ScoringRecipe:
        """The official greedy recipe: 10 epochs, AdamW lr 1e-4, wd 5e-5, per-epoch cosine, batch 256, 5 folds."""
        return cls(epochs=10, steps=None, batch_size=256, lr=1e-4, weight_decay=5e-5, optimizer="adamw", schedule="cosine", folds=5)

    @classmethod
    def fast(cls) -> ScoringRecipe:
        """This zoo's fixed budget: 100 AdamW steps, lr 1e-3, batch 32, constant LR, scored on the validation split."""
        return cls(epochs=None, steps=100, batch_size=32, lr=1e-3, weight_decay=0.0, optimizer="adamw", schedule="constant", folds=1)

    @classmethod
    def of(cls, recipe: ScoringRecipe | str | dict | None, **overrides) -> ScoringRecipe:
        """A recipe from a preset name (``official``, ``fast``), a recipe or a dict of fields, then ``overrides``
        that are not None (``steps`` replaces ``epochs``, and an ``epochs`` override clears ``steps``)."""
        if recipe is None or isinstance(recipe, str):
            presets = {"official": cls.official, "fast": cls.fast}
            if (recipe or "official") not in presets:
                raise ValueError(f"recipe={recipe!r}: expected one of {sorted(presets)} or a ScoringRecipe")
            recipe = presets[recipe or "official"]()
        elif isinstance(recipe, dict):
            recipe = cls(**recipe)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "epochs" in overrides and "steps" not in overrides:
            overrides["steps"] = None
        elif "steps" in overrides and "epochs" not in overrides:
            overrides["epochs"] = None
        return dataclasses.replace(recipe, **overrides)

    def build(self, params: Iterable[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer and LR scheduler (None: constant) of one run; the scheduler steps once per :meth:`units` item."""
        params = list(params)
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay, momentum=0.9)
        else:
            opt = (torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam)(params, lr=self.lr, weight_decay=self.weight_decay)
        horizon = self.steps if self.steps is not None else self.epochs
        if self.schedule == "cosine":
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=horizon)
        if self.schedule == "step":
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=horizon // 3 + 1, gamma=0.1)
        return opt, None

    def num_steps(self, n: int) -> int:
        """Optimizer steps of one run on ``n`` training samples."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(n / self.batch_size)

    def units(self, n: int, generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
        """The batches (index tensors) of one run, grouped by scheduler unit: one epoch (a fresh shuffle cut into
        batches), or with ``steps`` one step (batches drawn from consecutive shuffles, never across a reshuffle
        unless the data are fewer than a batch)."""
        if self.steps is None:
            for _ in range(self.epochs):
                yield list(torch.randperm(n, generator=generator).split(self.batch_size))
            return
        order = torch.empty(0, dtype=torch.long)
        for _ in range(self.steps):
            if len(order) < min(self.batch_size, n):
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            idx, order = order[: self.batch_size], order[self.batch_size :]
            yield [idx]


def fold_indices(n: int, folds: int, seed: int) -> list[torch.Tensor]:
    """The held-out folds of a k-fold cross-validation: a seeded shuffle of ``range(n)`` cut into ``folds``
    near-equal parts (sizes differ by at most one, as ``numpy.array_split`` in the official datamodule)."""
    if not 1 < folds <= n:
        raise ValueError(f"folds={folds}: expected 2 up to the {n} training samples")
    return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tensor_split(folds))
