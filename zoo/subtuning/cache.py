"""Per-sample outputs of SubTuning's frozen prefix, keyed by the batch's ``index`` in its dataset, and where such a
cache lives (:func:`cache_placement`: on the computing device when small, else in CPU memory, pinned for a GPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

AUTO_MAX_BYTES = 1 << 30  # cache_device "auto": a cache up to this size stays on the computing device


def cache_placement(cache_device: str | None, compute_device: torch.device | str, nbytes: int = 0) -> tuple[torch.device, bool]:
    """``(device, pinned)`` of a feature cache of ``nbytes`` whose features are computed on ``compute_device``.

    ``cache_device``: ``"auto"`` (or ``None``) keeps a cache of at most :data:`AUTO_MAX_BYTES` on ``compute_device`` and
    puts a larger one in CPU memory; ``"cpu"`` always CPU memory; any other device name, that device. CPU memory is
    pinned when the features come from a CUDA device (its rows then reach the GPU asynchronously)."""
    compute = torch.device(compute_device)
    if cache_device in (None, "auto"):
        device = compute if nbytes <= AUTO_MAX_BYTES else torch.device("cpu")
    else:
        try:
            device = torch.device(cache_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"cache_device={cache_device!r}: expected 'auto', 'cpu' or a torch device such as 'cuda:0' ({err})") from None
    return device, device.type == "cpu" and compute.type == "cuda"


def empty_rows(n: int, like: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """Zeros for ``n`` rows shaped and typed like ``like``'s rows, on ``device`` (pinned CPU memory with ``pin``)."""
    return torch.zeros((n, *like.shape[1:]), dtype=like.dtype, device=device, pin_memory=pin)


def take_rows(values: torch.Tensor, index: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """``values[index]`` on ``device``: from pinned CPU memory gathered into a pinned buffer and copied without blocking."""
    index = index.to(values.device)
    if values.device == device:
        return values[index]
    if not pin:
        return values[index].to(device)
    out = torch.empty((len(index), *values.shape[1:]), dtype=values.dtype, pin_memory=True)
    return torch.index_select(values, 0, index, out=out).to(device, non_blocking=True)


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
    """Per-sample outputs of a frozen prefix, keyed by the sample's index in ``source`` (its index space); grows as needed.

    The outputs live where ``device`` says (:func:`cache_placement`, decided at the first fill from the size of a
    cache over all of ``source``); :meth:`lookup` returns them on the device of the inputs. The ``filled`` mask stays
    on the device of the indices."""

    def __init__(self, source: Any = None, cache_device: str | None = "auto"):
        cache_placement(cache_device, "cpu")  # a bad name fails here
        self.source, self.cache_device = source, cache_device
        self.values: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        self.placed, self.pinned = False, False  # values where cache_device says (restored rows are not yet)
        self.placeholder: torch.Tensor | None = None  # zeros shaped like one input (CPU)
        self.dataset_len: int | None = None  # of a cache restored from a checkpoint, not bound to its dataset yet

    def _place(self, like: torch.Tensor, compute_device: torch.device) -> None:
        """Allocate ``values`` (or move the restored ones) where they belong, for rows like ``like``'s."""
        rows = len(self.filled)
        total = max(rows, len(self.source) if hasattr(self.source, "__len__") else self.dataset_len or 0)
        device, pin = cache_placement(self.cache_device, compute_device, total * like[0].numel() * like.element_size())
        values = empty_rows(rows, like, device, pin)
        if self.values is not None:
            values[: len(self.values)] = self.values
        self.values, self.pinned, self.placed = values, pin, True

    def lookup(self, index: torch.Tensor, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Outputs for samples ``index`` (on ``x``'s device); ``compute(x[missing])`` fills the ones not stored yet."""
        index = torch.as_tensor(index).long()
        if self.filled is not None and self.filled.device != index.device:  # restored from a checkpoint on the CPU
            self.filled = self.filled.to(index.device)
        need = int(index.max()) + 1
        if self.filled is None or need > len(self.filled):
            grow = max(need, 2 * len(self.filled) if self.filled is not None else need)
            filled = torch.zeros(grow, dtype=torch.bool, device=index.device)
            if self.filled is not None:
                filled[: len(self.filled)] = self.filled
            self.filled, old = filled, self.values
            if old is not None:
                self.values = empty_rows(grow, old, old.device, self.pinned)
                self.values[: len(old)] = old
        if self.values is not None and not self.placed:
            self._place(self.values, x.device)
        missing = ~self.filled[index]
        if missing.any():
            if self.placeholder is None:
                self.placeholder = torch.zeros(x.shape[1:], dtype=x.dtype)
            h = compute(x[missing])
            if self.values is None:
                self._place(h, x.device)
            where = index[missing]
            self.values[where.to(self.values.device)] = h.to(self.values.device)
            self.filled[where] = True
        return take_rows(self.values, index, x.device, self.pinned)

    def rows(self) -> torch.Tensor:
        """Indices of the filled rows."""
        if self.filled is None or self.values is None:
            return torch.zeros(0, dtype=torch.long)
        return self.filled.nonzero().flatten()

    def state(self) -> dict[str, Any]:
        """The filled rows (indices and values, on the CPU), for a checkpoint."""
        rows = self.rows()
        values = None if self.values is None else self.values[rows.to(self.values.device)].cpu()
        return {"index": rows.cpu(), "values": values, "size": 0 if self.filled is None else len(self.filled),
                "placeholder": self.placeholder, "dataset_len": len(self.source) if hasattr(self.source, "__len__") else None}

    @classmethod
    def from_states(cls, states: Sequence[dict[str, Any]], cache_device: str | None = "auto") -> FeatureCache:
        """A cache (not yet bound to a dataset) holding the rows of ``states`` (later states win), on the CPU until its
        first lookup places them."""
        cache = cls(cache_device=cache_device)
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
