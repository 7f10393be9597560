"""The fast data path: in-memory datasets held as one uint8 tensor, batches gathered and transformed whole.

- :class:`TensorPairs` holds a dataset's images as one ``uint8`` tensor ``[N, C, H, W]`` and its labels.
- A split over it (``LabeledSubset``, a continual ``TaskSet``) answers ``DataLoader``'s ``__getitems__`` with
  one indexing operation and one :class:`BatchTransform` call; it returns :class:`Gathered`, the collated
  batch, which :func:`collate` passes through (and which any other collate can still read sample by sample).
- :class:`BatchTransform` resizes, randomly crops (zero padding ``max(1, size // 8)``, offsets uniform in
  ``[0, 2 * padding]``, as torchvision's ``RandomCrop``) and flips (probability 1/2) and normalises a whole
  batch. Each sample's crop and flip come from a 32-bit key, a hash of ``(seed, epoch, position of the sample
  in its split)`` (:func:`sample_keys`, two rounds of :func:`mix32`): the augmentation of a sample depends on nothing else (not on the
  batch it lands in, workers, ranks or a resume), and the same integer hash gives the same draws on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as F

from zoo.batch import FIELDS, Batch, Deferred
from zoo.batch import collate as collate_samples

__all__ = ["BatchTransform", "Gathered", "Pending", "TensorPairs", "collate", "eval_batches", "finish", "gather_source", "merge", "mix32",
           "sample_keys", "shard_bounds"]

MASK32 = 0xFFFFFFFF


class TensorPairs(Dataset):
    """Untransformed samples held in memory: ``Batch(inputs=uint8 image tensor [C, H, W], targets=label)``;
    ``images`` is one ``[N, C, H, W]`` tensor and ``targets_tensor`` the labels, for gathering whole batches."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | list[int]):
        self.images = images.contiguous()
        self.targets = [int(t) for t in targets]
        self.targets_tensor = torch.tensor(self.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Batch:
        return Batch(inputs=self.images[i], targets=self.targets[i])


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply) of an int64 tensor of values in ``[0, 2**32)``;
    products stay below ``2**59``, so it is exact on every device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def sample_keys(seed: int, epoch: int | None, positions: torch.Tensor) -> torch.Tensor:
    """The augmentation key of each sample ``positions`` (its position in its split) in ``epoch`` under ``seed``."""
    base = ((seed * 1_000_003 + (epoch or 0)) * 10_000_019) % 2**64
    return mix32(mix32((positions.long() + (base & MASK32)) & MASK32) ^ (base >> 32))


def crop_flip(images: torch.Tensor, keys: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Each image zero-padded by ``padding``, cropped back to its size at offsets ``(top, left)`` and flipped
    horizontally (with ``flip``) as its key says: with ``m = 2 * padding + 1``, ``top = key % m``,
    ``left = key // m % m``, flipped when ``key // m**2`` is odd. One ``gather`` for the whole batch."""
    n, c, h, w = images.shape
    m, wp = 2 * padding + 1, w + 2 * padding
    rows, cols = torch.arange(h, device=images.device)[:, None] * wp, torch.arange(w, device=images.device)
    offset = (keys % m * wp + keys // m % m).view(n, 1, 1)
    if flip:
        index = offset + torch.where((keys // (m * m) % 2).bool().view(n, 1, 1), rows + (w - 1 - cols), rows + cols)
    else:
        index = offset + (rows + cols)
    padded = nnf.pad(images, [padding] * 4) if padding else images
    return padded.reshape(n, c, -1).gather(2, index.reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)


class BatchTransform:
    """Resize (when ``size != native_size``), random crop with ``padding`` and horizontal flip (``flip``), then
    scale to ``[0, 1]`` and normalise: on one image ``[C, H, W]`` or a batch ``[B, C, H, W]`` (``uint8`` tensors,
    or anything torchvision's ``to_image`` reads), on any device.

    Without ``keys`` a random transform draws one key per sample from the global RNG (as per-sample
    torchvision transforms do); with ``keys`` (:func:`sample_keys`) it is reproducible. Deterministic (no crop,
    no flip), it gives the same values as ``Compose([ToImage(), Resize, ToDtype(float32, scale=True), Normalize])``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int, native_size: int, padding: int = 0, flip: bool = False):
        self.mean, self.std, self.size, self.native_size = list(mean), list(std), size, native_size
        self.padding, self.flip = padding, flip

    @property
    def random(self) -> bool:
        return self.padding > 0 or self.flip

    def __call__(self, images: Any, keys: torch.Tensor | None = None) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else F.to_image(images)
        x = x.as_subclass(torch.Tensor)
        single = x.ndim == 3
        x = x[None] if single else x
        if self.size != self.native_size:
            x = F.resize(x, [self.size], antialias=True)
        if self.random:
            keys = torch.randint(0, 2**32, (len(x),)) if keys is None else keys
            x = crop_flip(x, keys.to(x.device), self.padding, self.flip)
        fresh = x.dtype != torch.float32 or self.random or self.size != self.native_size  # x is a new tensor: normalise in place
        x = F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std, inplace=fresh)
        return x[0] if single else x

    def __repr__(self) -> str:
        return f"BatchTransform(size={self.size}, padding={self.padding}, flip={self.flip}, mean={self.mean}, std={self.std})"


@dataclass
class Pending(Deferred):
    """Inputs whose transform is left for later (``transform_on_device``): the gathered images, their keys,
    the transform, and the samples to replace by ``placeholder`` (``hit``, cached ones). Lightning moves its
    tensors with the batch; :func:`finish` then transforms them where they are (e.g. on the GPU)."""

    images: torch.Tensor
    keys: torch.Tensor | None
    transform: BatchTransform
    hit: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None

    def finish(self) -> torch.Tensor:
        x = self.transform(self.images, keys=self.keys)
        if self.hit is not None:
            x[self.hit] = self.placeholder.to(x)
        return x


def finish(batch: Any) -> Any:
    """A batch with :class:`Pending` inputs transformed (where its tensors are); any other batch as it is."""
    return batch.ready() if isinstance(batch, Batch) else batch


class Gathered(Sequence):
    """A batch gathered at once (a collated :class:`~zoo.batch.Batch`), returned by ``__getitems__``.

    :func:`collate` returns ``batch`` as it is; read as a sequence it yields one ``Batch`` per sample, so a
    ``DataLoader`` with any other collate function still works (slower)."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch.targets)

    def __getitem__(self, k: int) -> Batch:  # type: ignore[override]
        if not isinstance(k, int):
            raise TypeError("Gathered samples are read one at a time")
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        self.batch = finish(self.batch)  # read sample by sample: transformed here
        return Batch(**{f: None if getattr(self.batch, f) is None else getattr(self.batch, f)[k] for f in FIELDS})


def take_rows(data: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``data[positions]``; a view of ``data`` (no copy) when ``positions`` are consecutive and this is not a loader
    worker (a view sent from a worker would move all of ``data`` to shared memory)."""
    n = len(positions)
    if n and get_worker_info() is None:
        first = int(positions[0])
        if int(positions[-1]) - first == n - 1 and (n < 3 or bool((positions.diff() == 1).all())):
            return data[first:first + n]
    return data.index_select(0, positions)


def collate(samples: Any) -> Batch:
    """The zoo's collate: a :class:`Gathered` batch as it is, else :class:`~zoo.batch.Batch` samples field by field."""
    if isinstance(samples, Gathered):
        return samples.batch
    return collate_samples(samples)


def place(values: list[torch.Tensor | None], where: list[torch.Tensor], n: int, fill: Any = None) -> torch.Tensor | None:
    """One tensor of ``n`` rows with ``values[k]`` at rows ``where[k]`` (``None`` parts: ``fill``, or all ``None``)."""
    first = next((v for v in values if v is not None), None)
    if first is None:
        return None
    out = first.new_full((n, *first.shape[1:]), fill) if fill is not None else first.new_empty((n, *first.shape[1:]))
    for w, v in zip(where, values):
        if v is not None:
            out[w] = v
    return out


def merge(parts: list[tuple[torch.Tensor, Batch]], n: int) -> Batch:
    """One batch of ``n`` samples from ``(where, part)`` pairs: ``part``'s samples go to positions ``where``."""
    where = [w for w, _ in parts]
    out = {}
    for f in FIELDS:
        values = [getattr(b, f) for _, b in parts]
        if isinstance(values[0], Pending):
            keys = None if values[0].keys is None else place([v.keys for v in values], where, n)
            hit = place([v.hit for v in values], where, n, fill=False)
            placeholder = next((v.placeholder for v in values if v.placeholder is not None), None)
            out[f] = Pending(place([v.images for v in values], where, n), keys, values[0].transform, hit, placeholder)
        else:
            out[f] = None if values[0] is None else place(values, where, n)
    return Batch(**out)


def gather_source(dataset: Any) -> tuple[Any, torch.Tensor | None] | None:
    """``(dataset that gathers whole batches, positions in it)`` behind ``dataset`` (through ``Subset`` wrappers), or
    ``None`` when its batches must be loaded item by item (e.g. files on disk)."""
    from torch.utils.data import Subset

    positions = None
    while isinstance(dataset, Subset):
        inner = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        positions = inner if positions is None else inner[positions]
        dataset = dataset.dataset
    gatherable = getattr(dataset, "gatherable", None)
    if callable(gatherable) and gatherable() and callable(getattr(dataset, "gather_items", None)):
        return dataset, positions
    return None


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, end)`` of ``n`` samples (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def eval_batches(dataset: Any, batch_size: int = 1024, device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                 limit: int | None = None, collate_fn: Any = None, num_workers: int = 0):
    """The samples of ``dataset`` (a split, a continual ``TaskSet``, ``Subset``\\ s of them), in order, as ready
    :class:`~zoo.batch.Batch` es of up to ``batch_size``: each batch is gathered from the in-memory tensors with one
    indexing operation (no ``DataLoader``); a dataset that cannot gather (e.g. ``ImageFolder``) is read through a
    ``DataLoader`` with ``collate_fn`` (default: the zoo's) and ``num_workers``, with the same samples.

    ``limit`` keeps the first samples only. With ``world_size > 1`` rank ``rank`` reads its contiguous share of them
    (:func:`shard_bounds`); every rank gets the same number of batches (a sharded model runs its forward as a
    collective), unless a rank has no sample at all. ``device``: batches are moved there, then deferred transforms
    (``transform_on_device``) run there."""
    from torch.utils.data import DataLoader

    from zoo.batch import as_batch, to_device

    n = len(dataset) if limit is None else min(limit, len(dataset))
    start, end = shard_bounds(n, rank, world_size)
    largest = -(-n // world_size)
    steps = -(-largest // batch_size)  # the batches of the largest share, on every rank
    chunks = list(torch.arange(start, end).split(batch_size))
    if 0 < len(chunks) < steps:  # a smaller share: as many (smaller) batches as the largest
        chunks = [c for c in torch.arange(start, end).tensor_split(steps) if len(c)]
    source = gather_source(dataset)
    if source is not None:
        base, positions = source
        batches = (base.gather_items(c if positions is None else positions[c]) for c in chunks)
    else:
        batches = DataLoader(dataset, batch_sampler=[c.tolist() for c in chunks], collate_fn=collate_fn or collate, num_workers=num_workers)
    for batch in batches:
        batch = as_batch(batch)
        yield (batch if device is None else to_device(batch, torch.device(device))).ready()
