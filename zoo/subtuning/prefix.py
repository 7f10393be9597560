""":class:`FrozenPrefix`: what a zoo module does with a backbone frozen by :class:`~zoo.subtuning.Freeze`.

Mixed into :class:`~zoo.subtuning.SubTuningModule` and the :mod:`zoo.continual` modules (so SubTuning runs inside a
continual stream); it does nothing unless the module's ``surgery`` holds a ``Freeze``. Then:

- the frozen prefix (everything before the first trainable layer) runs without autograd, and the frozen part of the
  backbone stays in eval mode (BatchNorm statistics never move, no dropout);
- with ``Freeze(cache_frozen_features=true)`` the prefix's output of every training (and validation) sample is
  computed once, keyed by the batch's ``index`` (named field; ``with_index: true`` on the datamodule), and reused.
  Only :meth:`batch_logits` (the stream's own batches) reads the cache: ``forward`` (replayed buffer samples, FPF,
  task evaluation) always runs the whole backbone, so samples without a dataset index never touch it. Under mixed
  precision the cache keeps the prefix's output in the dtype the run's autocast gives it (bf16 for a CNN prefix,
  float32 for a ViT's residual stream), so the cached run trains exactly as the uncached one (SubTuning has no
  official code to follow; nothing of the prefix is learned, so nothing needs float32 there);
- :meth:`cached_rows` tells a callback which samples of a dataset are cached
  (:class:`callbacks.skip_cached_inputs.SkipCachedInputs` stops loading their inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zoo.batch import Batch
from zoo.resume import gather_object, rank_and_world
from zoo import sharding
from zoo.subtuning.cache import FeatureCache, index_space
from zoo.subtuning.chain import LayerChain
from zoo.subtuning.layers import Freeze, freeze_except, frozen_eval, resolve_layers

CACHE_KEY = "subtuning_feature_cache"
WHO = "the SubTuning feature cache (Freeze cache_frozen_features: true)"


class FrozenPrefix:
    """Mixin for :class:`zoo.classifier.Classifier` subclasses (first in the bases); see the module docstring."""

    caches: dict[str, FeatureCache]

    # -- the Freeze ---------------------------------------------------------------------------------------
    @property
    def freeze_spec(self) -> Freeze | None:
        """The :class:`Freeze` in the module's ``surgery`` (applied or not yet), or None."""
        return next((t for t in getattr(self, "surgery", ()) if isinstance(t, Freeze)), None)

    @property
    def freeze(self) -> Freeze | None:
        """The module's :class:`Freeze` surgery, once applied (else None)."""
        return self.freeze_spec if getattr(self, "surgery_applied", False) else None

    @property
    def cache_frozen_features(self) -> bool:
        """Whether the ``Freeze`` asks for the feature cache (known from ``__init__``, before the surgery runs)."""
        spec = self.freeze_spec
        return spec is not None and spec.cache_frozen_features

    @property
    def chain(self) -> LayerChain:
        """The backbone as prefix -> blocks -> tail (rebuilt when surgery replaced the backbone)."""
        chain = self.__dict__.get("_chain")
        if chain is None or chain.backbone is not self.backbone:
            chain = LayerChain(self.backbone)
            self.__dict__["_chain"] = chain
        return chain

    def after_surgery(self) -> None:
        self.bind_freeze()

    def bind_freeze(self) -> None:
        """Read the trainable layers from the ``Freeze`` (after surgery or :meth:`set_trainable_layers`)."""
        freeze = self.freeze
        self.__dict__.setdefault("caches", {})
        self.__dict__.setdefault("_restored", {})
        if freeze is None:
            self.trainable_names, self.trainable_modules, self.start = [], [], None
            return
        from zoo.backbones import HFEncoder

        if freeze.cache_frozen_features and isinstance(self.backbone, HFEncoder):
            raise ValueError("cache_frozen_features=true does not support Hugging Face models: their token states depend on each batch's padding")
        self.trainable_names = freeze.names(self.backbone)
        self.trainable_modules = [self.chain.root.get_submodule(n) for n in self.trainable_names]
        start = self.chain.start_of(self.trainable_names)
        if start != getattr(self, "start", None):
            self.caches, self._restored = {}, {}  # another prefix: cached outputs no longer apply
        self.start = start
        self.train(self.training)

    def set_trainable_layers(self, trainable_layers: Sequence[str | int] | None) -> None:
        """(Re)choose the finetuned layers, e.g. from a finetuning profile, before training starts."""
        freeze = self.freeze
        if freeze is None:
            raise ValueError(f"{type(self).__name__} has no zoo.subtuning.Freeze surgery (applied) whose layers could be set")
        names = resolve_layers(self.backbone, trainable_layers, freeze.granularity)
        freeze.trainable_layers = list(names)
        freeze_except(self.backbone, names)
        self.caches, self._restored = {}, {}
        self.start = None
        self.bind_freeze()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze is not None and getattr(self, "trainable_modules", None) is not None:
            frozen_eval(self.backbone, self.trainable_modules, mode)
        return self

    # -- forward ------------------------------------------------------------------------------------------
    def features(self, x: Any) -> torch.Tensor:
        """Pooled features: the frozen prefix without autograd, then the trainable suffix (no cache)."""
        with torch.no_grad():
            h, ctx = self.chain.prefix(x, self.start)
        return self.chain.suffix(h, ctx, x, self.start)

    def forward(self, x: Any) -> torch.Tensor:
        if self.freeze is None:
            return super().forward(x)
        return self.head(self.features(x))

    def batch_logits(self, batch: Batch) -> torch.Tensor:
        """Training batches (and validation batches with an ``index``) go through the cache when it is on."""
        if self.freeze is not None and self.freeze.cache_frozen_features:
            split = "train" if self.training else self.__dict__.get("_eval_split")
            index = batch.require("index", by=WHO) if split == "train" else batch.index if split else None
            if index is not None:
                h = self.cached_prefix(batch.inputs, index, split)
                return self.head(self.chain.suffix(h, ((), {}), batch.inputs, self.start))
        return super().batch_logits(batch)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        self.__dict__["_eval_split"] = f"val{dataloader_idx}"  # each validation loader has its own cache
        try:
            return super().validation_step(batch, batch_idx)
        finally:
            self.__dict__["_eval_split"] = None

    def _uncached_prefix(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h, (rest, kwargs) = self.chain.prefix(x, self.start)
        if rest or kwargs:
            raise RuntimeError("cache_frozen_features: the first trainable layer takes extra inputs, which cannot be cached")
        return h

    def cached_prefix(self, x: Any, index: torch.Tensor, split: str = "train") -> torch.Tensor:
        """The frozen prefix's output for samples ``index`` of ``split``, computed only for samples not seen before."""
        cache = self.caches.setdefault(split, FeatureCache(cache_device=self.freeze_spec.cache_device))
        if sharding.is_sharded(self):
            self._prefix_in_step(cache, index, x)
        return cache.lookup(index, x, self._uncached_prefix)

    def _prefix_in_step(self, cache: FeatureCache, index: torch.Tensor, x: Any) -> None:
        """Sharded: the prefix's blocks gather their shards with every rank, so when any rank has samples to compute,
        a rank with none runs the prefix too (on one sample, discarded) instead of leaving the others waiting."""
        import torch.distributed as dist

        index = torch.as_tensor(index).long()
        filled = cache.filled
        missing = filled is None or int(index.max()) >= len(filled) or not bool(filled.to(index.device)[index].all())
        anyone = torch.tensor([float(missing)], device=x.device if torch.is_tensor(x) else index.device)
        dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
        if anyone.item() and not missing:
            self._uncached_prefix(x[:1] if torch.is_tensor(x) else x)

    def cached_rows(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cached mask, placeholder input)`` of the samples of ``dataset`` whose prefix outputs are cached (a CPU
        snapshot), or None when none is or ``dataset`` is not the index space of a cache (e.g. a stream's tasks)."""
        if dataset is None or index_space(dataset) is not dataset:
            return None
        cache = next((c for c in self.caches.values() if c.source is dataset and c.placeholder is not None), None)
        return None if cache is None else (cache.filled.to("cpu", copy=True), cache.placeholder)

    # -- checks and one cache per dataset --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self.cache_frozen_features or stage != "fit":
            return
        from datamodules.continual import ContinualDataModule

        dm = self.trainer.datamodule
        inner = dm.data if isinstance(dm, ContinualDataModule) else dm  # a stream: the datamodule it splits
        if inner is None or not hasattr(inner, "deterministic_train_transform"):
            raise ValueError("cache_frozen_features=true needs a zoo datamodule (it checks deterministic_train_transform and with_index)")
        if not inner.deterministic_train_transform:
            raise ValueError(f"cache_frozen_features=true but {type(inner).__name__}.deterministic_train_transform is False "
                             "(random augmentation would make cached features stale): set data augment: false or cache_frozen_features: false")
        if not getattr(inner, "with_index", False):
            where = "data.init_args.data.init_args.with_index" if inner is not dm else "data.init_args.with_index"
            raise ValueError(f"cache_frozen_features=true needs sample indices in the batches: set {where}: true ({type(inner).__name__})")

    def _check_source(self, loader: Any, split: str) -> None:
        """A split whose loader now reads another dataset (e.g. ``validate`` on new data) gets that dataset's
        cache: a new one, or the one another split already keeps for the same dataset object."""
        dataset = index_space(getattr(loader, "dataset", None))
        if split in self.caches and self.caches[split].source is dataset:
            return
        restored = self._restored.pop(split, None)
        if restored is not None and restored.source is None and self.trainer.state.fn == "fit" and restored.dataset_len == getattr(dataset, "__len__", lambda: None)():
            restored.source = dataset  # resuming fit: the split's data, as checked by its size
            self.caches[split] = restored
            return
        shared = next((c for c in self.caches.values() if dataset is not None and c.source is dataset), None)
        self.caches[split] = shared or FeatureCache(dataset, cache_device=self.freeze_spec.cache_device)

    def on_train_start(self) -> None:  # a run resumed mid-epoch gets no on_train_epoch_start before its first batch
        super().on_train_start()
        if self.cache_frozen_features:
            self._check_source(self.trainer.train_dataloader, "train")

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.cache_frozen_features:
            self._check_source(self.trainer.train_dataloader, "train")

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.cache_frozen_features:
            loaders = self.trainer.val_dataloaders
            for k, loader in enumerate(loaders if isinstance(loaders, (list, tuple)) else [loaders]):
                self._check_source(loader, f"val{k}")

    # -- the cache in checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's filled rows (a collective under DDP: every rank saves, rank 0's file keeps all)."""
        super().on_save_checkpoint(checkpoint)
        if not (self.cache_frozen_features and self.freeze_spec.checkpoint_feature_cache):
            return
        unique = list({id(c): c for c in self.caches.values()}.values())
        state = {"start": self.start, "splits": {k: unique.index(c) for k, c in self.caches.items()}, "caches": [c.state() for c in unique]}
        checkpoint[CACHE_KEY] = {"ranks": gather_object(state)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep this rank's saved rows (all ranks' under another world size) until ``fit`` meets the split's data."""
        super().on_load_checkpoint(checkpoint)
        self._restored = {}
        saved = checkpoint.get(CACHE_KEY)
        if not (self.cache_frozen_features and saved):
            return
        world = rank_and_world()[1]
        ranks = [saved["ranks"][self.global_rank]] if len(saved["ranks"]) == world else saved["ranks"]
        if any(r["start"] != self.start for r in ranks):
            return  # another frozen prefix: the saved features do not apply
        unique: dict[int, FeatureCache] = {}
        for split in ranks[0]["splits"]:
            i = ranks[0]["splits"][split]
            unique.setdefault(i, FeatureCache.from_states([r["caches"][r["splits"][split]] for r in ranks if split in r["splits"]], cache_device=self.freeze_spec.cache_device))
            self._restored[split] = unique[i]
