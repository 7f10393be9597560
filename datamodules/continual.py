"""Task streams for continual learning: any classification datamodule split into a sequence of tasks.

Scenarios (van de Ven & Tolias, "Three scenarios for continual learning", 2019):

- ``class``: class-incremental. Task ``t`` holds classes ``class_order[t*k:(t+1)*k]``; one head over all
  classes, no task id at test time.
- ``task``: task-incremental. Same split, but the task id travels with every batch and the model masks its
  logits to the task's classes.
- ``domain``: domain-incremental. Same split, labels become the position inside the task (``num_classes = k``),
  so every task shares the same ``k`` outputs (e.g. Split MNIST "first or second digit of the pair").

Labels are remapped to their position in ``class_order``, so task ``t`` always owns labels ``t*k .. t*k+k-1``.
Batches are :class:`~zoo.batch.Batch` with ``inputs``, ``targets`` and ``task``; training batches also carry
``raw``, the input before any transform (``uint8`` images where the data allow) so replay buffers store it
compactly. With ``with_index: true`` on the nested datamodule, training and validation batches carry ``index``,
the sample's position in the nested datamodule's split (unique across tasks).

One ``zoo fit`` runs the whole stream: epoch ``e`` trains task ``e // epochs_per_task``. The loaders change
with the task, so the trainer must rebuild them every epoch; ``setup`` checks that, and ``trainer.max_epochs``,
and fails before training with what to set::

    trainer: {max_epochs: 10, reload_dataloaders_every_n_epochs: 1}   # 5 tasks x 2 epochs_per_task
    data:
      class_path: datamodules.continual.ContinualDataModule
      init_args:
        data: {class_path: datamodules.FashionMNIST, init_args: {batch_size: 32}}
        scenario: class
        classes_per_task: 2
        epochs_per_task: 2
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.base import ClassificationDataModule, LabeledSubset
from datamodules.resumable import EpochConcat, EpochItems, eval_loader, eval_order, train_loader
from datamodules.tensor import BatchTransform, collate, finish
from zoo.batch import Batch

SCENARIOS = ("class", "task", "domain")


class TaskSet(EpochItems, Dataset):
    """The samples of one task in a :class:`LabeledSubset`, relabelled: ``Batch(inputs, targets, task, raw, index)``.

    ``raw`` only ``with_raw`` (training); ``index`` (the position in ``subset``) only when ``subset.with_index``.
    """

    def __init__(self, subset: LabeledSubset, positions: list[int], label_map: list[int], task: int, with_raw: bool):
        self.subset, self.positions, self.label_map, self.task, self.with_raw = subset, positions, label_map, task, with_raw
        self.targets = [label_map[subset.targets[p]] for p in positions]
        self.position_tensor = torch.as_tensor(positions, dtype=torch.long)
        self.target_tensor = torch.as_tensor(self.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.positions)

    def item(self, i: int, epoch: int | None = None) -> Batch:
        p = self.positions[i]
        sample = self.subset.load(p, epoch)  # augmentation seeded by the sample's position in the split
        raw = None
        if self.with_raw:
            compact = isinstance(sample.raw, torch.Tensor) and sample.raw.dtype == torch.uint8
            raw = sample.raw if compact else sample.inputs
        return Batch(inputs=sample.inputs, targets=self.targets[i], task=self.task, raw=raw, index=p if self.subset.with_index else None)

    def gatherable(self) -> bool:
        return self.subset.gatherable()

    def gather_items(self, indices: torch.Tensor, epoch: int | None = None) -> Batch:
        """The collated ``[item(i, epoch) for i in indices]``, gathered at once from the subset."""
        p = self.position_tensor.index_select(0, indices)
        sample = self.subset.load_batch(p, epoch, with_raw=self.with_raw)
        raw = None
        if self.with_raw:
            raw = sample.raw if sample.raw.dtype == torch.uint8 else sample.inputs
        return Batch(inputs=sample.inputs, targets=self.target_tensor.index_select(0, indices), task=torch.full((len(p),), self.task, dtype=torch.long),
                     raw=raw, index=p if self.subset.with_index else None)


class ContinualDataModule(LightningDataModule):
    """Wraps a classification datamodule into a stream of tasks (see the module docstring).

    Args:
        data: the datamodule to split (its ``batch_size``, ``num_workers``, ``seed``, transforms are used).
        scenario: ``class``, ``task`` or ``domain``.
        classes_per_task: classes in each task; must divide the number of classes.
        class_order: the classes in the order they arrive (a permutation of ``range(num_classes)``).
        class_order_seed: draw a random class order with this seed (when ``class_order`` is not given).
        epochs_per_task: training epochs on each task.
        cumulative: task ``t`` trains (and validates) on tasks ``0..t`` together; Joint training needs ``true``.
    """

    def __init__(
        self,
        data: ClassificationDataModule,
        scenario: str = "class",
        classes_per_task: int = 2,
        class_order: list[int] | None = None,
        class_order_seed: int | None = None,
        epochs_per_task: int = 1,
        cumulative: bool = False,
    ):
        super().__init__()
        total = data.num_classes
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario={scenario!r}: expected one of {SCENARIOS}")
        if classes_per_task < 1 or total % classes_per_task:
            raise ValueError(f"classes_per_task={classes_per_task} does not divide the {total} classes of {type(data).__name__}; "
                             f"allowed: {[k for k in range(1, total + 1) if total % k == 0]}")
        if scenario == "domain" and classes_per_task < 2:
            raise ValueError("classes_per_task=1 with scenario='domain' leaves a single output; use >= 2")
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task={epochs_per_task}: expected a positive integer")
        if class_order is not None:
            missing = sorted(set(range(total)) - set(class_order))
            repeated = sorted({c for c in class_order if class_order.count(c) > 1})
            outside = sorted({c for c in class_order if not 0 <= c < total})
            if missing or repeated or outside:
                raise ValueError(f"class_order={class_order} must be a permutation of 0..{total - 1}: "
                                 f"missing {missing}, repeated {repeated}, out of range {outside}")
        elif class_order_seed is not None:
            class_order = torch.randperm(total, generator=torch.Generator().manual_seed(class_order_seed)).tolist()
        else:
            class_order = list(range(total))
        self.data, self.scenario, self.classes_per_task, self.epochs_per_task = data, scenario, classes_per_task, epochs_per_task
        self.class_order = list(class_order)
        self.num_tasks = total // classes_per_task
        self.num_classes = classes_per_task if scenario == "domain" else total
        position = {c: i for i, c in enumerate(self.class_order)}
        self.label_map = [position[c] % classes_per_task if scenario == "domain" else position[c] for c in range(total)]
        self.cumulative = cumulative
        self._tasks: dict[str, list[TaskSet]] = {}
        if getattr(data, "transform_on_device", False):  # the nested datamodule's option; Lightning calls the stream's hook
            self.on_after_batch_transfer = self.transform_batch

    # -- the stream ---------------------------------------------------------------------
    def task_classes(self, task: int) -> list[int]:
        """The original class ids of ``task``."""
        self._check_task(task)
        k = self.classes_per_task
        return self.class_order[task * k:(task + 1) * k]

    def task_labels(self, task: int) -> list[int]:
        """The (remapped) labels the model sees for ``task``."""
        return sorted({self.label_map[c] for c in self.task_classes(task)})

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained in ``epoch`` (the last task once the stream is over)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def task_set(self, split: str, task: int) -> TaskSet:
        """``split`` (train/val/test) data of one task."""
        self._check_task(task)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: expected 'train', 'val' or 'test'")
        return self._tasks[split][task]

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task id {task} out of range: this stream has tasks 0..{self.num_tasks - 1}")

    def buffer_transform(self, raw: torch.Tensor) -> torch.Tensor:
        """The training transform for a batch of raw inputs drawn from a replay buffer."""
        if raw.dtype != torch.uint8:  # the buffer already holds transformed inputs
            return raw
        transform = self.data.train_set.transform
        if isinstance(transform, BatchTransform):  # the whole batch at once; a random one draws from the global RNG
            return transform(raw)
        if self.data.deterministic_train_transform:
            return transform(raw)
        return torch.stack([transform(r) for r in raw])

    # -- LightningDataModule ------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is not None and stage in ("fit", None):
            expected = self.epochs_per_task * self.num_tasks
            if not trainer.fast_dev_run and (trainer.max_epochs is None or trainer.max_epochs % self.epochs_per_task or not 0 < trainer.max_epochs <= expected):
                raise ValueError(f"trainer.max_epochs={trainer.max_epochs}: a stream of {self.num_tasks} tasks x epochs_per_task="
                                 f"{self.epochs_per_task} needs max_epochs={expected} (or a smaller multiple of {self.epochs_per_task})")
            if trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(f"trainer.reload_dataloaders_every_n_epochs={trainer.reload_dataloaders_every_n_epochs}: a task stream "
                                 "changes its loaders with the task; set trainer.reload_dataloaders_every_n_epochs: 1")
        if self._tasks:
            return
        self.data.setup(stage)
        for split, subset in (("train", self.data.train_set), ("val", self.data.val_set), ("test", self.data.test_set)):
            by_class: dict[int, list[int]] = {}
            for p, y in enumerate(subset.targets):
                by_class.setdefault(y, []).append(p)
            self._tasks[split] = [
                TaskSet(subset, sorted(p for c in self.class_order[t * self.classes_per_task:(t + 1) * self.classes_per_task] for p in by_class.get(c, [])),
                        self.label_map, t, with_raw=split == "train")
                for t in range(self.num_tasks)
            ]

    @property
    def current_task(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else trainer.current_epoch
        return self.task_of_epoch(min(trainer.current_epoch, last))  # after fit: the last task trained

    def collate_fn(self, samples: list[Batch]) -> Batch:
        """Collate samples of the stream's datasets into one :class:`~zoo.batch.Batch` (as its loaders do)."""
        return collate(samples)

    def transform_batch(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """A batch of the stream's loaders with its inputs transformed where its tensors are (see the nested
        datamodule's ``transform_on_device``); call it on batches read outside the Trainer."""
        return finish(batch)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        seed, batch_size, workers = self.data.hparams.seed, self.data.batch_size, self.data.num_workers
        if shuffle:
            return train_loader(dataset, batch_size, seed, workers)
        # Evaluation reads several tasks in one fixed seeded order, so limit_val/test_batches sees every task.
        eval_batch_size = getattr(self.data, "eval_batch_size", None) or batch_size
        return eval_loader(Subset(dataset, eval_order(range(len(dataset)), seed)), eval_batch_size, workers)

    def train_dataloader(self) -> DataLoader:
        t = self.current_task
        tasks = range(t + 1) if self.cumulative else [t]
        return self._loader(EpochConcat([self._tasks["train"][i] for i in tasks]), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        t = self.current_task
        tasks = range(t + 1) if self.cumulative else [t]
        return self._loader(EpochConcat([self._tasks["val"][i] for i in tasks]), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test data of every task seen so far (all tasks once the stream is over)."""
        return self._loader(EpochConcat(self._tasks["test"][:self.current_task + 1]), shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"class_order": self.class_order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["class_order"] != self.class_order:
            raise ValueError(f"the checkpoint's class_order {state['class_order']} differs from this stream's {self.class_order}")
