"""Shared image-classification DataModule: seeded train/val split, per-split transforms, low-data subsets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from datamodules.resumable import EpochShuffle, eval_loader, eval_order, train_loader
from datamodules.subset import LabeledSubset
from datamodules.tensor import BatchTransform, collate, finish
from zoo.batch import Batch

__all__ = ["ClassificationDataModule", "EpochShuffle", "LabeledSubset", "Splits", "per_class_subset", "split_indices"]


def split_indices(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(len(targets))`` into train and val indices."""
    n = len(targets)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def per_class_subset(indices: Sequence[int], targets: Sequence[int], samples_per_class: int, seed: int) -> list[int]:
    """The first ``samples_per_class`` indices of each class after a seeded shuffle."""
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    counts: dict[int, int] = {}
    keep = []
    for p in perm:
        i = indices[p]
        c = int(targets[i])
        if counts.get(c, 0) < samples_per_class:
            counts[c] = counts.get(c, 0) + 1
            keep.append(i)
    return sorted(keep)


class Splits:
    """Mixin of datamodules with ``train_set``, ``val_set`` and ``test_set``: :meth:`split` reads one by name."""

    def split(self, name: str) -> LabeledSubset:
        """The ``train``, ``val`` or ``test`` split (after ``setup``)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split={name!r}: expected 'train', 'val' or 'test'")
        subset = getattr(self, f"{name}_set")
        if subset is None:
            raise ValueError(f"{type(self).__name__} is not set up yet: call setup() before reading its {name} split")
        return subset


class ClassificationDataModule(Splits, LightningDataModule):
    """Base of the zoo's classification datamodules.

    Subclasses implement :meth:`load_split` (``"train"`` / ``"test"``) returning a dataset of
    untransformed ``(image, label)`` pairs and its list of targets, and set ``num_classes``,
    ``in_chans``, ``native_size``, ``mean`` and ``std``. Every split yields :class:`~zoo.batch.Batch`
    samples (``inputs``, ``targets``, and ``index`` with ``with_index``); loaders collate them with
    :meth:`collate_fn`. :meth:`eval_view` gives a deterministic copy of a split (e.g. to cache outputs).
    The hyperparameters are this class's own init arguments; a subclass with more arguments saves
    all of them with ``self.save_hyperparameters({...})`` (a dict) after ``super().__init__``.

    Args:
        data_dir: where the data lives (or is downloaded to).
        batch_size: per process.
        eval_batch_size: batch size of the validation, test and predict loaders (default ``batch_size``). Data held in
            memory evaluates faster in larger batches (fewer per-batch steps of the loop); the values logged are the
            same (means over the split), but ``limit_val_batches``/``limit_test_batches`` count these batches.
        num_workers: DataLoader workers.
        val_fraction: part of the training split held out for validation (seeded).
        seed: seed of the split and of ``samples_per_class``.
        samples_per_class: keep only this many training samples per class (low-data regimes).
        image_size: resize images to this size (default: the dataset's own).
        augment: random crop (and flip where it makes sense) on the training split.
        download: download the data when it is absent.
        with_index: training and validation batches carry ``index`` (the sample's position in its
            split), for techniques that key per-sample state (e.g. cached teacher outputs).
        fast: in-memory data (:class:`~datamodules.tensor.TensorPairs`) is gathered and transformed a batch at a
            time (:class:`~datamodules.tensor.BatchTransform`); ``false`` keeps the per-sample path (torchvision
            transforms item by item): the same samples in the same order, and the same inputs without ``augment``.
        transform_on_device: with ``fast``, loaders yield the gathered uint8 images untransformed
            (:class:`~datamodules.tensor.Pending`) and the transform runs on the whole batch after Lightning moved it
            to the device (``on_after_batch_transfer``: on the GPU when there is one). Code that reads this
            datamodule's loaders outside the Trainer calls :meth:`transform_batch` on each batch (``eval_view``
            is always transformed in its loader).
        cache_mb: with ``fast`` and without ``transform_on_device``, a split whose transform is deterministic
            (evaluation splits; training without ``augment``) keeps its transformed float inputs after the first
            batch when they fit in this many MiB (:meth:`LabeledSubset.transformed`): later batches gather float
            rows instead of converting and normalising again (issue 17). ``0``: transform every batch.
    """

    num_classes: int = 0
    in_chans: int = 3
    native_size: int = 32
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    flip: bool = False

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        samples_per_class: int | None = None,
        image_size: int | None = None,
        augment: bool = False,
        download: bool = True,
        with_index: bool = False,
        fast: bool = True,
        transform_on_device: bool = False,
        eval_batch_size: int | None = None,
        cache_mb: int = 256,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction}: expected a value in [0, 1)")
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class={samples_per_class}: expected a positive integer or null")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        if cache_mb < 0:
            raise ValueError(f"cache_mb={cache_mb}: expected a size in MiB >= 0 (0: transform every batch)")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={eval_batch_size}: expected a positive integer or null (= batch_size)")
        # An explicit dict: LightningCLI hands a datamodule nested in another (ContinualDataModule) the outer one's
        # config as "given" hyperparameters; a dict argument keeps this module's own.
        self.save_hyperparameters(dict(
            data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction, seed=seed,
            samples_per_class=samples_per_class, image_size=image_size, augment=augment, download=download, with_index=with_index,
            fast=fast, transform_on_device=transform_on_device, eval_batch_size=eval_batch_size, cache_mb=cache_mb,
        ))
        self.cache_mb = cache_mb
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.own_eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.image_size = image_size or self.native_size
        self.augment = augment
        self.download = download
        self.with_index = with_index
        self.fast = fast
        self.transform_on_device = transform_on_device and fast
        if self.transform_on_device:  # only then: a module's own on_after_batch_transfer stays in use otherwise
            self.on_after_batch_transfer = self.transform_batch
        self.train_set: LabeledSubset | None = None
        self.val_set: LabeledSubset | None = None
        self.test_set: LabeledSubset | None = None

    @property
    def eval_batch_size(self) -> int:
        """The evaluation loaders' batch size: ``eval_batch_size``, else ``batch_size`` (as it is now)."""
        return self.own_eval_batch_size or self.batch_size

    # -- to implement -------------------------------------------------------------------
    def load_split(self, split: str) -> tuple[Dataset, Sequence[int]]:
        raise NotImplementedError

    # -- transforms ---------------------------------------------------------------------
    @property
    def deterministic_train_transform(self) -> bool:
        """True when the training transform has no randomness (so per-sample outputs can be cached)."""
        return not self.augment

    def batch_transform(self, train: bool) -> BatchTransform:
        """The fast path's transform: the same resize and normalisation, and with ``augment`` (training) the same
        distribution of crops (zero padding ``max(1, image_size // 8)``) and flips (where ``flip``)."""
        augment = train and self.augment
        return BatchTransform(self.mean, self.std, self.image_size, self.native_size,
                              padding=max(1, self.image_size // 8) if augment else 0, flip=augment and self.flip)

    def eval_transform(self) -> Callable:
        if self.fast:
            return self.batch_transform(train=False)
        ops: list[Any] = [T.ToImage()]
        if self.image_size != self.native_size:
            ops.append(T.Resize(self.image_size, antialias=True))
        return T.Compose(ops + [T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])

    def train_transform(self) -> Callable:
        if not self.augment:
            return self.eval_transform()
        if self.fast:
            return self.batch_transform(train=True)
        ops: list[Any] = [T.ToImage()]
        if self.image_size != self.native_size:
            ops.append(T.Resize(self.image_size, antialias=True))
        ops.append(T.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)))
        if self.flip:
            ops.append(T.RandomHorizontalFlip())
        return T.Compose(ops + [T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])

    # -- LightningDataModule ------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_data, train_targets = self.load_split("train")
        train_idx, val_idx = split_indices(train_targets, self.hparams.val_fraction, self.hparams.seed)
        if self.hparams.samples_per_class:
            train_idx = per_class_subset(train_idx, train_targets, self.hparams.samples_per_class, self.hparams.seed)
        self.train_set = self.train_subset(train_data, train_idx, train_targets)
        self.val_set = self.eval_subset(train_data, val_idx, train_targets, self.with_index)
        test_data, test_targets = self.load_split("test")
        self.test_set = self.eval_subset(test_data, range(len(test_targets)), test_targets)

    def train_subset(self, data: Dataset, indices: Sequence[int], targets: Sequence[int]) -> LabeledSubset:
        """The training split; a random transform is seeded per (seed, epoch, sample)."""
        seed = None if self.deterministic_train_transform else self.hparams.seed
        subset = LabeledSubset(data, indices, targets, self.train_transform(), self.with_index, augment_seed=seed)
        subset.defer, subset.cache_bytes = self.transform_on_device, self.cache_mb * 2**20
        return subset

    def eval_subset(self, data: Dataset, indices: Sequence[int], targets: Sequence[int], with_index: bool = False) -> LabeledSubset:
        """An evaluation split, in a fixed seeded order (so ``limit_val_batches`` reads a sample of every class)."""
        subset = LabeledSubset(data, eval_order(indices, self.hparams.seed), targets, self.eval_transform(), with_index)
        subset.defer, subset.cache_bytes = self.transform_on_device, self.cache_mb * 2**20
        return subset

    def eval_view(self, split: str = "train") -> LabeledSubset:
        """A copy of ``split`` with the evaluation transform and ``index`` in every sample: the same samples in
        the same order (``index`` as in the split's own batches), deterministic, nothing skipped. For a
        technique that computes per-sample state once (teacher outputs, frozen features); the split itself
        and its loaders are left as they are."""
        return self.split(split).view(transform=self.eval_transform(), with_index=True)

    def collate_fn(self, samples: list[Batch]) -> Batch:
        """Collate samples of this datamodule's datasets into one :class:`~zoo.batch.Batch` (as its loaders do)."""
        return collate(samples)

    def transform_batch(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """A batch of this datamodule's loaders with its inputs transformed where its tensors are: what
        ``on_after_batch_transfer`` does with ``transform_on_device`` (a batch already transformed is returned as it is)."""
        return finish(batch)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if shuffle:
            return train_loader(dataset, self.batch_size, self.hparams.seed, self.num_workers, persistent_workers=True)
        return eval_loader(dataset, self.eval_batch_size, self.num_workers, persistent_workers=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split in its file order, so predictions line up with the data."""
        return self._loader(self.test_set.in_order(), shuffle=False)

    def teardown(self, stage: str) -> None:
        for subset in (self.train_set, self.val_set, self.test_set):
            if subset is not None:
                subset.skip_cached(None)

    def on_exception(self, exception: BaseException) -> None:
        self.teardown("fit")
