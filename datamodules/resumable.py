"""Training loaders that resume mid-epoch exactly, and augmentation seeded per sample.

- :class:`EpochShuffle` orders an epoch by ``(seed, epoch)`` only.
- :class:`EpochBatchSampler` hands out batches of indices that carry their epoch, and skips the first
  ``skip`` batches of its next pass by drawing their indices only (no data is loaded).
- :class:`ResumableLoader` is a ``DataLoader`` with ``state_dict``/``load_state_dict``: Lightning saves its
  state in every checkpoint (the epoch, the batches the training loop has taken, each rank's global RNG
  states) and loads it into the loader it builds on resume, which then continues with the next batch.
  Under DDP Lightning rebuilds the loader with a ``DistributedSampler`` inside the same batch sampler, so
  the order still depends only on (seed, epoch) and every rank skips its own first batches.
- A dataset with a random transform seeds it from ``(seed, epoch, sample index)`` (:func:`seeded`), so
  augmentation does not depend on workers, prefetching or where a run was resumed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, IterableDataset, RandomSampler

from datamodules.tensor import Gathered, collate, merge


class EpochShuffle(RandomSampler):
    """Random order that depends only on ``(seed, epoch)``, so a resumed run replays the same batches.

    Lightning calls ``set_epoch`` before every training epoch (and under DDP replaces this sampler
    with its own epoch-seeded ``DistributedSampler``, as it does any ``RandomSampler``).
    """

    def __init__(self, data_source: Dataset, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # a list iterator, not a generator (a batch of 64 would resume one 64 times); made when a pass starts, after
        # set_epoch: BatchSampler asks for it at its first batch
        return iter(torch.randperm(len(self.data_source), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist())


class EpochBatch(list):
    """A batch of dataset indices with the ``epoch`` it belongs to (datasets seed augmentation with it)."""

    epoch: int | None = None


class EpochBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose batches carry their sampler's epoch; ``skip`` drops the first batches of the next pass."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool = False):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[EpochBatch]:
        return self._batches(getattr(self.sampler, "epoch", None), self.skip)

    def _batches(self, epoch: int | None, skip: int) -> Iterator[EpochBatch]:
        for k, indices in enumerate(super().__iter__()):
            if k >= skip:
                batch = EpochBatch(indices)
                batch.epoch = epoch
                yield batch


def direct(loader: DataLoader) -> bool:
    """Whether ``loader``'s batches can be read in this process without its iterator machinery: no workers, no
    pinned memory, a map-style dataset collated in batches (what ``DataLoader``'s single-process iterator does)."""
    return (loader.num_workers == 0 and not loader.pin_memory and loader.batch_sampler is not None
            and not isinstance(loader.dataset, IterableDataset))


def direct_batches(loader: DataLoader) -> Iterator[Any]:
    """``loader``'s batches as its single-process iterator makes them (``__getitems__`` or item by item, then
    ``collate_fn``), without the iterator's per-batch bookkeeping (about 0.1 ms a batch, as much as gathering a
    small batch from memory). The batch sampler's iterator is made now, as ``iter(loader)`` makes it."""
    dataset, collate_fn = loader.dataset, loader.collate_fn
    fetch = getattr(dataset, "__getitems__", None) or (lambda indices: [dataset[i] for i in indices])
    return (collate_fn(fetch(indices)) for indices in iter(loader.batch_sampler))


class DirectLoader(DataLoader):
    """A ``DataLoader`` that reads its batches with :func:`direct_batches` when :func:`direct` allows it (else as
    ``DataLoader``): the same batches, cheaper. Under DDP Lightning rebuilds it like any ``DataLoader``."""

    def __iter__(self) -> Iterator[Any]:
        return direct_batches(self) if direct(self) else super().__iter__()


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochBatchSampler` that Lightning can checkpoint mid-epoch.

    The state counts the batches this loader has handed to the training loop in the current epoch
    (Lightning fetches a sized loader's batches one at a time, when the training step needs them, so at a
    checkpoint that is the number of steps taken). On load, the next pass of the same epoch skips that
    many batches and the global RNG states of the checkpoint are restored right before its first batch,
    where the interrupted run stood; a pass of another epoch (the checkpoint was written at an epoch's
    end) starts at its beginning.
    """

    _pending: dict[str, Any] | None = None
    _epoch: int | None = None
    _consumed: int = 0

    def __iter__(self) -> Iterator[Any]:
        return self._resume()

    def _resume(self) -> Iterator[Any]:
        # A generator: the pass starts at the first ``next``, after Lightning's ``set_epoch``.
        pending, self._pending = self._pending, None
        epoch = getattr(self.batch_sampler.sampler, "epoch", None)
        skip = pending["batches"] if pending is not None and pending["epoch"] == epoch else 0
        self._epoch, self._consumed = epoch, skip
        self.batch_sampler.skip = skip
        try:  # (worker iterators draw the sampler's iterator more than once while they start)
            batches = direct_batches(self) if direct(self) else super().__iter__()
        finally:
            self.batch_sampler.skip = 0
        if pending is not None and pending.get("rng") is not None:
            from zoo.resume import restore_rng_states

            restore_rng_states(pending["rng"])  # after creating the iterator, which may draw from the global RNG
        for batch in batches:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``epoch``, ``batches`` taken in it, and ``rng``: every rank's global RNG states (a collective under DDP)."""
        from zoo.resume import gather_rng_states

        if self._pending is not None:  # loaded but not resumed yet
            return {**self._pending, "rng": gather_rng_states()}
        return {"epoch": self._epoch, "batches": self._consumed, "rng": gather_rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)


def train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, collate_fn: Callable = collate,
                 persistent_workers: bool = False) -> ResumableLoader:
    """The zoo's training loader: ``(seed, epoch)``-shuffled, resumable mid-epoch; collates ``zoo.batch.Batch`` samples."""
    return ResumableLoader(dataset, batch_sampler=EpochBatchSampler(EpochShuffle(dataset, seed), batch_size), num_workers=num_workers,
                           collate_fn=collate_fn, persistent_workers=persistent_workers and num_workers > 0,
                           generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, collate_fn: Callable = collate,
                persistent_workers: bool = False) -> DataLoader:
    """An evaluation loader in the dataset's order (collating ``zoo.batch.Batch`` samples); it draws nothing from the global RNG."""
    return DirectLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                        persistent_workers=persistent_workers and num_workers > 0, generator=torch.Generator())


def eval_order(indices: Sequence[int], seed: int) -> list[int]:
    """``indices`` in a fixed seeded order: evaluation splits are read in this order, so the first batches
    (``limit_val_batches``) are a fair sample instead of one class of a file sorted by class."""
    indices = list(indices)
    return [indices[p] for p in torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 2)).tolist()]


def sample_seed(seed: int, epoch: int | None, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``."""
    return ((seed * 1_000_003 + (epoch or 0)) * 10_000_019 + index) % (2**63)


@contextmanager
def seeded(seed: int):
    """Run the block on the CPU generator seeded with ``seed``; the global RNG is left as it was."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class EpochItems:
    """Mixin of datasets whose ``item(i, epoch)`` seeds augmentation by epoch: a batch of indices from
    :class:`EpochBatchSampler` carries its epoch (``DataLoader`` calls ``__getitems__``); ``dataset[i]`` is epoch 0.
    A dataset that can gather a whole batch at once (``gatherable()``) returns ``gather_items(indices, epoch)``,
    the collated items, as :class:`~datamodules.tensor.Gathered`."""

    def item(self, i: int, epoch: int | None = None) -> Any:
        raise NotImplementedError

    def gatherable(self) -> bool:
        return False

    def gather_items(self, indices: torch.Tensor, epoch: int | None = None) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Any:
        return self.item(i)

    def __getitems__(self, indices: list[int]) -> list[Any] | Gathered:
        epoch = getattr(indices, "epoch", None)
        if self.gatherable():
            positions = torch.from_numpy(np.fromiter(indices, dtype=np.int64, count=len(indices)))  # (4x faster than as_tensor)
            return Gathered(self.gather_items(positions, epoch))
        return [self.item(i, epoch) for i in indices]


class EpochConcat(EpochItems, ConcatDataset):
    """``ConcatDataset`` that passes a batch's epoch on to datasets with ``item(i, epoch)``; when every dataset
    gathers whole batches, a batch is gathered from each and merged in the batch's order."""

    def gatherable(self) -> bool:
        return all(isinstance(d, EpochItems) and d.gatherable() for d in self.datasets)

    def gather_items(self, indices: torch.Tensor, epoch: int | None = None) -> Any:
        if len(self.datasets) == 1:  # one task: its batch as it is (no bucketing)
            return self.datasets[0].gather_items(indices, epoch)
        which = torch.bucketize(indices, torch.as_tensor(self.cumulative_sizes), right=True)
        parts = []
        for d in which.unique().tolist():
            where = (which == d).nonzero().flatten()
            parts.append((where, self.datasets[d].gather_items(indices[where] - (self.cumulative_sizes[d - 1] if d else 0), epoch)))
        return parts[0][1] if len(parts) == 1 else merge(parts, len(indices))

    def item(self, i: int, epoch: int | None = None) -> Any:
        d = bisect.bisect_right(self.cumulative_sizes, i)
        ds, j = self.datasets[d], i - (self.cumulative_sizes[d - 1] if d else 0)
        return ds.item(j, epoch) if hasattr(ds, "item") else ds[j]
