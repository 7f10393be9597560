"""A split of a dataset with its own transform: the items of every image datamodule (:class:`LabeledSubset`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from datamodules.resumable import EpochItems, sample_seed, seeded
from datamodules.tensor import BatchTransform, Pending, TensorPairs, sample_keys, take_rows
from zoo.batch import Batch, as_batch

__all__ = ["LabeledSubset"]


class LabeledSubset(EpochItems, Dataset):
    """``dataset[indices]`` with its own transform, yielding :class:`~zoo.batch.Batch` samples; ``targets``
    lists the labels of the subset.

    The underlying dataset returns untransformed ``(image, label)`` pairs (or ``Batch`` samples), so the same
    data can serve train (augmented) and val (deterministic) splits. With ``with_index`` a sample's ``index`` is
    its position in the subset (else ``None``); a technique that has cached what it needs from some inputs
    (e.g. SubTuning's frozen features) calls :meth:`skip_cached`, and those samples come back without loading
    or transforming their input. With ``augment_seed`` the (random) transform of item ``i`` in epoch ``e``
    draws from a generator seeded with ``(augment_seed, e, i)``; the zoo's training loaders pass the
    epoch with each batch of indices (plain ``dataset[i]`` uses epoch 0).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: Sequence[int], transform: Callable | None = None, with_index: bool = False,
                 augment_seed: int | None = None):
        self.dataset = dataset
        self.indices = list(indices)
        self.targets = [int(targets[i]) for i in self.indices]
        self.transform = transform
        self.with_index = with_index
        self.augment_seed = augment_seed
        self.cached: torch.Tensor | None = None
        self.placeholder: torch.Tensor | None = None
        self.defer = False  # gathered batches leave their transform to the datamodule's on_after_batch_transfer
        self.cache_bytes = 0  # > 0: a deterministic batch transform's outputs are kept (see :meth:`transformed`)

    def __len__(self) -> int:
        return len(self.indices)

    def skip_cached(self, cached: torch.Tensor | None, placeholder: torch.Tensor | None = None) -> None:
        """Items ``i`` with ``cached[i]`` true (a CPU bool tensor) come back as ``Batch(inputs=placeholder, targets=y, index=i)``.

        ``placeholder`` has the shape of a transformed input, so batches still collate; ``None``
        loads every input again. Needs ``with_index``. DataLoader workers that persist across
        epochs keep the setting they started with.
        """
        if cached is not None and not self.with_index:
            raise ValueError("skip_cached needs with_index=True: the batch's indices say which inputs were skipped")
        self.cached, self.placeholder = cached, placeholder

    def load(self, i: int, epoch: int | None = None) -> Batch:
        """Item ``i`` as ``Batch(inputs=transformed input, targets=label, raw=untransformed input)`` (as augmented in ``epoch``)."""
        sample = as_batch(self.dataset[self.indices[i]])
        raw, y = sample.inputs, int(sample.targets)
        if self.transform is None:
            return Batch(inputs=raw, targets=y, raw=raw)
        if isinstance(self.transform, BatchTransform) and self.transform.random:
            keys = None if self.augment_seed is None else sample_keys(self.augment_seed, epoch, torch.tensor([i]))
            return Batch(inputs=self.transform(raw, keys=keys), targets=y, raw=raw)
        if self.augment_seed is None:
            return Batch(inputs=self.transform(raw), targets=y, raw=raw)
        with seeded(sample_seed(self.augment_seed, epoch, i)):
            return Batch(inputs=self.transform(raw), targets=y, raw=raw)

    def gatherable(self) -> bool:
        """True when batches are gathered at once (tensor-backed data, a batch transform or none)."""
        return isinstance(self.dataset, TensorPairs) and (self.transform is None or isinstance(self.transform, BatchTransform))

    def rows(self) -> torch.Tensor:
        """``indices`` as a tensor (rebuilt when ``indices`` is replaced)."""
        if self.__dict__.get("_rows_of") is not self.indices:
            self._rows_of, self._rows = self.indices, torch.as_tensor(self.indices, dtype=torch.long)
        return self._rows

    def transformed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The transformed inputs of the whole subset and their targets, in its order, made at the first call and kept
        while ``indices`` and ``transform`` stay the same -- when the transform is a deterministic :class:`BatchTransform`
        run in the loader (not deferred to the device) and the float tensor fits in ``cache_bytes``; else ``None``.
        Evaluation splits (read every epoch, every task) and unaugmented training splits then gather float rows instead
        of converting and normalising each batch again: the same values, bit for bit (the transform is per sample).
        Batches of consecutive positions (evaluation in order) are views of it (:func:`take_rows`); a step that changes
        its inputs in place bumps the cache's version counter, and the cache is made again at the next batch."""
        transform = self.transform
        if (self.cache_bytes <= 0 or self.defer or not isinstance(transform, BatchTransform) or transform.random
                or not isinstance(self.dataset, TensorPairs) or len(self) == 0):
            return None
        of = self.__dict__.get("_transformed_of")  # (indices, transform, version of the inputs when made)
        kept = self.__dict__.get("_transformed")
        # (identity: comparing lists costs per batch)
        if of is None or of[0] is not self.indices or of[1] is not transform or (kept is not None and kept[0]._version != of[2]):
            self._transformed_of, self._transformed = (self.indices, transform, 0), None
            sample = transform(self.dataset.images[self.indices[0]][None])
            if sample.numel() * sample.element_size() * len(self) <= self.cache_bytes:
                rows = self.rows()
                with torch.inference_mode(False):  # (made in an evaluation loop or not: plain tensors, with a version counter)
                    inputs = torch.cat([transform(self.dataset.images.index_select(0, rows[i:i + 4096])) for i in range(0, len(rows), 4096)])
                    self._transformed = (inputs, self.dataset.targets_tensor.index_select(0, rows))
                self._transformed_of = (self.indices, transform, inputs._version)
        return self._transformed

    def load_batch(self, positions: torch.Tensor, epoch: int | None = None, skip: bool = False, with_raw: bool = True) -> Batch:
        """Items ``positions`` at once: ``Batch(inputs, targets, raw)`` as :meth:`load` gives them, collated (one
        indexing of the data, one transform call); with ``skip`` the cached items get the placeholder instead;
        without ``with_raw`` a batch of :meth:`transformed` inputs has no ``raw``."""
        skipping = skip and self.cached is not None and self.placeholder is not None
        kept = self.transformed()
        if kept is not None and not with_raw and not skipping:
            return Batch(inputs=take_rows(kept[0], positions), targets=take_rows(kept[1], positions))
        rows = self.rows().index_select(0, positions)  # index_select: the same rows as ``[rows]``, several times faster
        raw, targets = self.dataset.images.index_select(0, rows), self.dataset.targets_tensor.index_select(0, rows)
        transform = self.transform
        if transform is None:
            return Batch(inputs=raw, targets=targets, raw=raw)
        keys = None
        if transform.random and self.augment_seed is not None:
            keys = sample_keys(self.augment_seed, epoch, positions)
        hit = None  # the cached samples (with ``skip``)
        if skipping:
            inside = positions < len(self.cached)
            hit = torch.zeros(len(positions), dtype=torch.bool)
            hit[inside] = self.cached[positions[inside]]
            hit = hit if hit.any() else None
        if self.defer:
            return Batch(inputs=Pending(raw, keys, transform, hit, None if hit is None else self.placeholder), targets=targets, raw=raw)
        if hit is None:
            inputs = transform(raw, keys=keys) if kept is None else kept[0].index_select(0, positions)
            return Batch(inputs=inputs, targets=targets, raw=raw)
        inputs, load = self.placeholder.expand(len(positions), *self.placeholder.shape).clone(), ~hit
        if load.any():
            inputs[load] = transform(raw[load], keys=None if keys is None else keys[load]).to(inputs.dtype)
        return Batch(inputs=inputs, targets=targets, raw=raw)

    def gather_items(self, positions: torch.Tensor, epoch: int | None = None) -> Batch:
        """The collated ``[item(i, epoch) for i in positions]``, gathered at once."""
        batch = self.load_batch(positions, epoch, skip=True, with_raw=False)
        return batch.replace(raw=None, index=positions if self.with_index else None)

    def item(self, i: int, epoch: int | None = None) -> Batch:
        if self.cached is not None and i < len(self.cached) and self.cached[i]:
            return Batch(inputs=self.placeholder, targets=self.targets[i], index=i)
        return self.load(i, epoch).replace(raw=None, index=i if self.with_index else None)

    def view(self, transform: Callable | None, with_index: bool) -> LabeledSubset:
        """A copy of the same items, in the same order, with a deterministic ``transform`` and ``with_index``; nothing skipped.
        The subset itself is left as it is."""
        view = copy.copy(self)
        view.transform, view.with_index, view.augment_seed = transform, with_index, None
        view.cached = view.placeholder = None
        view.defer = False  # read outside the Trainer: transformed in the loader
        view.cache_bytes = 0  # read once (or a few items of it): transforming the whole view up front would cost more
        return view

    def in_order(self) -> LabeledSubset:
        """The same items in the order of the underlying dataset (e.g. for predictions aligned with a file)."""
        order = sorted(range(len(self)), key=self.indices.__getitem__)
        view = copy.copy(self)
        view.indices, view.targets = [self.indices[p] for p in order], [self.targets[p] for p in order]
        view.cache_bytes = 0  # read once, e.g. for predictions
        return view
