"""Per-sample outputs of SubTuning's frozen prefix, keyed by the batch's ``index`` in its dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def index_space(dataset: Any) -> Any:
    """The dataset whose positions a batch's ``index`` counts.

    A zoo split (``LabeledSubset``) counts its own positions; a continual stream's loaders wrap the nested
    datamodule's split (``TaskSet``s, concatenated, in a fixed evaluation order), whose positions the stream's
    ``index`` gives, so all tasks of a stream share one index space. Anything else is its own space.
    """
    from torch.utils.data import ConcatDataset, Subset

    from datamodules.base import LabeledSubset
    from datamodules.continual import TaskSet

    while True:
        if isinstance(dataset, LabeledSubset) or dataset is None:
            return dataset
        if isinstance(dataset, TaskSet):
            dataset = dataset.subset
        elif isinstance(dataset, Subset):  # items keep the inner dataset's index
            dataset = dataset.dataset
        elif isinstance(dataset, ConcatDataset):
            spaces = {id(s): s for s in (index_space(d) for d in dataset.datasets)}
            return next(iter(spaces.values())) if len(spaces) == 1 else dataset
        else:
            return dataset


class FeatureCache:
    """Per-sample outputs of a frozen prefix, keyed by the sample's index in ``source`` (its index space); grows as needed."""

    def __init__(self, source: Any = None):
        self.source = source
        self.values: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        self.placeholder: torch.Tensor | None = None  # zeros shaped like one input (CPU)
        self.dataset_len: int | None = None  # of a cache restored from a checkpoint, not bound to its dataset yet

    def lookup(self, index: torch.Tensor, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Outputs for samples ``index``; ``compute(x[missing])`` fills the ones not stored yet."""
        index = torch.as_tensor(index).long()
        if self.filled is not None and self.filled.device != index.device:  # restored from a checkpoint on the CPU
            self.filled = self.filled.to(index.device)
            self.values = None if self.values is None else self.values.to(index.device)
        need = int(index.max()) + 1
        if self.filled is None or need > len(self.filled):
            grow = max(need, 2 * len(self.filled) if self.filled is not None else need)
            filled = torch.zeros(grow, dtype=torch.bool, device=index.device)
            if self.filled is not None:
                filled[: len(self.filled)] = self.filled
            self.filled, old = filled, self.values
            self.values = None if old is None else torch.cat([old, old.new_zeros(grow - len(old), *old.shape[1:])])
        missing = ~self.filled[index]
        if missing.any():
            if self.placeholder is None:
                self.placeholder = torch.zeros(x.shape[1:], dtype=x.dtype)
            h = compute(x[missing])
            if self.values is None:
                self.values = h.new_zeros(len(self.filled), *h.shape[1:])
            self.values[index[missing]] = h
            self.filled[index[missing]] = True
        return self.values[index]

    def rows(self) -> torch.Tensor:
        """Indices of the filled rows."""
        if self.filled is None or self.values is None:
            return torch.zeros(0, dtype=torch.long)
        return self.filled.nonzero().flatten()

    def state(self) -> dict[str, Any]:
        """The filled rows (indices and values, on the CPU), for a checkpoint."""
        rows = self.rows()
        return {"index": rows.cpu(), "values": None if self.values is None else self.values[rows].cpu(), "size": 0 if self.filled is None else len(self.filled),
                "placeholder": self.placeholder, "dataset_len": len(self.source) if hasattr(self.source, "__len__") else None}

    @classmethod
    def from_states(cls, states: Sequence[dict[str, Any]]) -> FeatureCache:
        """A cache (not yet bound to a dataset) holding the rows of ``states`` (later states win)."""
        cache = cls()
        cache.dataset_len = states[0]["dataset_len"]
        cache.filled = torch.zeros(max(st["size"] for st in states), dtype=torch.bool)
        for st in states:
            if st["values"] is not None and len(st["index"]):
                if cache.values is None:
                    cache.values = st["values"].new_zeros(len(cache.filled), *st["values"].shape[1:])
                cache.values[st["index"]] = st["values"]
                cache.filled[st["index"]] = True
                cache.placeholder = st["placeholder"]
        return cache
