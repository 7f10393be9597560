"""The one batch type of the zoo: named fields, never read by position.

Every datamodule's datasets yield :class:`Batch` items (one sample each) and its loaders collate
them with :func:`collate` into a :class:`Batch` of tensors. Fields a datamodule does not provide
are ``None``; a part that needs one calls :meth:`Batch.require`, which names the datamodule
option that provides it::

    index = batch.require("index", by="SubTuningModule(cache_frozen_features=true)")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

# Where each optional field comes from: the message of a part that needs an absent field.
PROVIDED_BY = {
    "index": "set `with_index: true` on the datamodule (data.init_args.with_index, or data.init_args.data.init_args.with_index "
             "inside a continual stream)",
    "task": "train on a task stream: datamodules.continual.ContinualDataModule",
    "raw": "ContinualDataModule's training batches carry the untransformed inputs",
}


class Deferred:
    """Inputs whose transform a datamodule left for later (``transform_on_device``: run on the device after
    the transfer). :meth:`Batch.ready` runs it; subclasses implement :meth:`finish`."""

    def finish(self) -> Any:
        raise NotImplementedError


@dataclass
class Batch:
    """``inputs`` (tensor, or a dict of tokenizer outputs), ``targets`` and, when present, ``index`` (of the
    sample in its dataset), ``task`` (continual streams) and ``raw`` (the input before any transform)."""

    inputs: Any
    targets: Any
    index: Any = None
    task: Any = None
    raw: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def require(self, field: str, by: str) -> Any:
        """The field, or a ``ValueError`` that names ``by`` (who needs it) and the datamodule option that gives it."""
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"{by} needs the batch field {field!r}, which this datamodule does not provide: "
                             f"{PROVIDED_BY.get(field, 'no zoo datamodule provides it')}")
        return value

    def replace(self, **changes: Any) -> Batch:
        return dataclasses.replace(self, **changes)

    def ready(self) -> Batch:
        """This batch with deferred inputs (:class:`Deferred`) transformed where their tensors are; else itself.
        Code that reads a datamodule's loaders outside the Trainer calls it (the Trainer's own steps get ready
        batches from the datamodule's ``on_after_batch_transfer``)."""
        return self.replace(inputs=self.inputs.finish()) if isinstance(self.inputs, Deferred) else self


FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


def collate(samples: list[Batch]) -> Batch:
    """Collate :class:`Batch` samples field by field (``default_collate``); absent fields stay ``None``."""
    first = samples[0]
    if not isinstance(first, Batch):
        raise TypeError(f"zoo loaders collate zoo.batch.Batch samples; the dataset yielded {type(first).__name__}")
    return Batch(**{f: None if getattr(first, f) is None else default_collate([getattr(s, f) for s in samples]) for f in FIELDS})


def as_batch(data: Any) -> Batch:
    """A :class:`Batch` as is; a plain ``(inputs, targets)`` pair (e.g. a user's own DataLoader of a
    ``TensorDataset``) becomes one. Anything else fails, saying what the zoo expects."""
    if isinstance(data, Batch):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return Batch(inputs=data[0], targets=data[1])
    raise TypeError(f"expected a zoo.batch.Batch (or an (inputs, targets) pair), got {type(data).__name__}"
                    + (f" of {len(data)} items: name them with zoo.batch.Batch" if isinstance(data, (tuple, list)) else ""))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device`` field by field (Lightning's generic walk over a dataclass costs tens of microseconds a
    step, more than a small model's data); ``batch`` itself when every field is there already."""
    moved = {f: _field_to(getattr(batch, f), device) for f in FIELDS}
    return batch if all(moved[f] is getattr(batch, f) for f in FIELDS) else batch.replace(**moved)


def _field_to(value: Any, device: torch.device) -> Any:
    """``value`` on ``device``: a tensor (itself when it is there already), a dict of tensors (tokenizer outputs), or
    anything else through Lightning's ``move_data_to_device`` (e.g. deferred inputs)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if type(value) is dict and all(isinstance(v, torch.Tensor) for v in value.values()):
        out = {k: _field_to(v, device) for k, v in value.items()}
        return value if all(out[k] is value[k] for k in value) else out
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(value, device)
