"""SubTuning: finetune a chosen subset of a pretrained network's layers, freeze the rest.

Kaplun et al., "Less is More: Selective Layer Finetuning with SubTuning", 2023
(https://arxiv.org/abs/2302.06354). The layers to train come from the *finetuning profile*
and a greedy search (:mod:`zoo.subtuning_profile`). Because the network before the first
finetuned layer is frozen, it runs without autograd, its outputs can be cached across epochs,
and several tasks can share it at inference (:class:`MultiTaskSubTuned`).

Candidate layers, by family (names are relative to the backbone; for Hugging Face models,
to the wrapped ``HFEncoder.model``):

==================  ======================  ======================
family              ``granularity="block"``  ``granularity="stage"``
==================  ======================  ======================
timm ViT            ``blocks.i``             ``blocks.i``
timm ResNet         ``layerX.Y``             ``layerX``
timm EfficientNet   ``blocks.i.j``           ``blocks.i``
HF BERT-like        ``encoder.layer.i``      ``encoder.layer.i``
HF Llama-like       ``layers.i``             ``layers.i``
==================  ======================  ======================

YAML::

    model:
      class_path: zoo.subtuning.SubTuningModule
      init_args:
        model: pypi/efficientnet_lite0
        pretrained: true
        granularity: stage
        trainable_layers: [blocks.5, blocks.6]   # or indices: [5, 6]
        cache_frozen_features: true               # needs data.init_args.with_index: true
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from zoo.backbones import HFEncoder
from zoo.classifier import Classifier
from zoo.resume import gather_object, rank_and_world

GRANULARITIES = ("block", "stage")


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass at the input of a layer."""


def _root(backbone: nn.Module) -> nn.Module:
    return backbone.model if isinstance(backbone, HFEncoder) else backbone


def model_family(backbone: nn.Module) -> str:
    """``vit``, ``resnet``, ``efficientnet``, ``bert`` or ``llama``; anything else fails with the list."""
    root = _root(backbone)
    if isinstance(backbone, HFEncoder):
        if hasattr(root, "encoder") and hasattr(root.encoder, "layer"):
            return "bert"
        if isinstance(getattr(root, "layers", None), nn.ModuleList) and hasattr(root, "norm"):
            return "llama"
    else:
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet
        from timm.models.vision_transformer import VisionTransformer

        for cls, name in ((VisionTransformer, "vit"), (ResNet, "resnet"), (EfficientNet, "efficientnet")):
            if isinstance(root, cls):
                return name
    raise ValueError(
        f"SubTuning does not know the layers of {type(root).__name__}: supported are timm VisionTransformer, "
        "ResNet and EfficientNet, and Hugging Face BERT-like (encoder.layer) and Llama-like (layers) models"
    )


def _blocks(backbone: nn.Module) -> list[tuple[str, str]]:
    """``(block name, stage name)`` for every block, in forward order."""
    root, family = _root(backbone), model_family(backbone)
    if family == "vit":
        return [(f"blocks.{i}", f"blocks.{i}") for i in range(len(root.blocks))]
    if family == "resnet":
        return [(f"layer{s}.{j}", f"layer{s}") for s in range(1, 5) for j in range(len(getattr(root, f"layer{s}")))]
    if family == "efficientnet":
        return [(f"blocks.{i}.{j}", f"blocks.{i}") for i, stage in enumerate(root.blocks) for j in range(len(stage))]
    prefix = "encoder.layer" if family == "bert" else "layers"
    n = len(root.get_submodule(prefix))
    return [(f"{prefix}.{i}", f"{prefix}.{i}") for i in range(n)]


def _backbone_of(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model


def candidate_layers(model: nn.Module, granularity: str = "block") -> list[str]:
    """Names of the layers SubTuning can finetune, in forward order (see the module docstring).

    ``model`` is a backbone from :func:`zoo.backbones.build_backbone` or a zoo module with a ``backbone``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
    names = [b if granularity == "block" else s for b, s in _blocks(_backbone_of(model))]
    return list(dict.fromkeys(names))


def resolve_layers(backbone: nn.Module, trainable_layers: Sequence[str | int] | None, granularity: str = "block") -> list[str]:
    """Names (or indices into :func:`candidate_layers`) -> names in forward order; bad ones fail with the valid list."""
    valid = candidate_layers(backbone, granularity)
    names = []
    for item in trainable_layers or []:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"trainable_layers item {item!r}: expected a layer name or an index, valid names: {valid}")
        if isinstance(item, int):
            if not -len(valid) <= item < len(valid):
                raise ValueError(f"trainable_layers index {item} is out of range: there are {len(valid)} layers: {valid}")
            item = valid[item]
        if item not in valid:
            raise ValueError(f"unknown layer {item!r} in trainable_layers; valid names ({granularity} granularity): {valid}")
        if item in names:
            raise ValueError(f"layer {item!r} is listed twice in trainable_layers")
        names.append(item)
    return sorted(names, key=valid.index)


def _covered(name: str, trainable: Sequence[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in trainable)


def freeze_except(backbone: nn.Module, trainable: Sequence[str]) -> list[nn.Module]:
    """Freeze every parameter of ``backbone`` outside the named layers; return those layers' modules."""
    root = _root(backbone)
    for name, p in root.named_parameters():
        p.requires_grad_(_covered(name, trainable))
    inside = {id(p) for p in root.parameters()}
    for p in backbone.parameters():  # parameters of a wrapper outside ``root`` (none for HFEncoder)
        if id(p) not in inside:
            p.requires_grad_(False)
    return [root.get_submodule(t) for t in trainable]


def frozen_eval(backbone: nn.Module, trainable_modules: Sequence[nn.Module], mode: bool = True) -> None:
    """Put the frozen part of ``backbone`` in eval mode (BatchNorm statistics stay put, no dropout)."""
    backbone.eval()
    for m in trainable_modules:
        m.train(mode)


class LayerChain:
    """A backbone seen as ``prefix -> blocks[0..n) -> tail``, runnable from any block.

    ``prefix(x, s)`` runs the model up to the input of block ``s`` (``s == n``: the last block's output);
    ``suffix(h, ctx, x, s)`` runs blocks ``s..n`` and the tail. Together they equal ``backbone(x)``.
    A plain object (not an ``nn.Module``), so it registers no parameters twice.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.root = _root(backbone)
        self.family = model_family(backbone)
        self.names = [b for b, _ in _blocks(backbone)]
        self.layers = [self.root.get_submodule(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.layers)

    def start_of(self, trainable: Sequence[str]) -> int:
        """Index of the first block inside a trainable layer (``len(self)`` when none is)."""
        return next((i for i, n in enumerate(self.names) if _covered(n, trainable)), len(self))

    def prefix(self, x: Any, start: int) -> tuple[torch.Tensor, tuple[tuple, dict]]:
        captured = {}

        def pre_hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        def hook(module, args, output):
            captured["args"], captured["kwargs"] = (output[0] if isinstance(output, tuple) else output,), {}
            raise _Stop

        if start < len(self):
            handle = self.layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            handle = self.layers[-1].register_forward_hook(hook)
        try:
            self.backbone(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError(f"the forward pass of {type(self.root).__name__} never reached {self.names[min(start, len(self) - 1)]}")
        args, kwargs = captured["args"], dict(captured["kwargs"])
        h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        # Replayed layers must not write to (or read from) a KV cache: several suffixes may share a context.
        if "past_key_values" in kwargs:
            kwargs["past_key_values"] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return h, (rest, kwargs)

    def run(self, h: torch.Tensor, ctx: tuple[tuple, dict], first: int, last: int, layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Blocks ``first..last`` (exclusive); ``layers`` replaces ``self.layers`` (multi-task branches)."""
        rest, kwargs = ctx
        layers = self.layers if layers is None else layers
        for i in range(first, last):
            h = layers[i](h, *rest, **kwargs)
            if isinstance(h, tuple):
                h = h[0]
        return h

    def tail(self, h: torch.Tensor, x: Any) -> torch.Tensor:
        root = self.root
        if self.family == "vit":
            return root.forward_head(root.norm(h), pre_logits=True)
        if self.family == "resnet":
            return root.forward_head(h, pre_logits=True)
        if self.family == "efficientnet":
            return root.forward_head(root.bn2(root.conv_head(h)), pre_logits=True)
        if self.family == "llama":
            h = root.norm(h)
        return self.backbone.pool(h, x)

    def suffix(self, h: torch.Tensor, ctx: tuple[tuple, dict], x: Any, start: int, layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        return self.tail(self.run(h, ctx, start, len(self), layers), x)


class FeatureCache:
    """Per-sample outputs of a frozen prefix, keyed by the sample's index in ``source`` (its dataset); grows as needed."""

    def __init__(self, source: Any = None):
        self.source = source
        self.values: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        self.placeholder: torch.Tensor | None = None  # zeros shaped like one input (CPU)
        self.dataset_len: int | None = None  # of a cache restored from a checkpoint, not bound to its dataset yet

    def lookup(self, index: torch.Tensor, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Outputs for samples ``index``; ``compute(x[missing])`` fills the ones not stored yet."""
        index = index.long()
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

    def state(self) -> dict[str, Any]:
        """The filled rows (indices and values, on the CPU), for a checkpoint."""
        rows = self.filled.nonzero().flatten() if self.filled is not None and self.values is not None else torch.zeros(0, dtype=torch.long)
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


_CACHE_KEY = "subtuning_feature_cache"


class SubTuningModule(Classifier):
    """A classifier that finetunes only ``trainable_layers`` of its backbone (and its new head).

    The frozen prefix (everything before the first trainable layer) runs under ``torch.no_grad``;
    the frozen part of the backbone stays in eval mode, so BatchNorm statistics never move.

    Args:
        trainable_layers: layer names from :func:`candidate_layers` or indices into it; empty or
            ``null`` trains the head alone (a linear probe).
        granularity: ``block`` or ``stage`` (ResNet stages ``layerX``, EfficientNet stages ``blocks.i``).
        cache_frozen_features: compute the frozen prefix's output once per training and validation
            sample and reuse it in later epochs. After each epoch the datasets are told which
            samples are cached (:meth:`LabeledSubset.skip_cached`; not seen by persistent DataLoader
            workers, which keep loading) and stop loading their inputs, so later epochs load no
            images and run only the finetuned part. Needs a datamodule with ``with_index: true``
            and a deterministic training transform (``augment: false``). Holds the prefix outputs
            of both splits in memory, one cache per dataset (new data starts a new one).
        checkpoint_feature_cache: save the cache's filled rows in checkpoints (with the cached split names
            and each rank's rows under DDP, gathered to rank 0), so that a run resumed by ``fit`` reuses
            them and trains bit for bit like an uninterrupted one (recomputed features can differ in their
            lowest bits). Each checkpoint grows by the prefix outputs of every cached sample (e.g. N x C x
            H x W floats) and gathering them costs time on every save; ``false`` keeps checkpoints small
            and the cache refills after a resume (equal up to rounding).
        (other args: see :class:`zoo.classifier.Classifier`)
    """

    def __init__(
        self,
        model: str,
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        trainable_layers: list[str | int] | None = None,
        granularity: str = "block",
        cache_frozen_features: bool = False,
        checkpoint_feature_cache: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ):
        if not isinstance(model, str):
            raise ValueError(f"model={model!r}: SubTuningModule needs a model name (see zoo.backbones)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
        super().__init__(model, num_classes, pretrained, model_kwargs, optimizer, lr_scheduler, scheduler_interval, label_smoothing)
        self.chain = LayerChain(self.backbone)
        self.cache_frozen_features = cache_frozen_features
        self.checkpoint_feature_cache = checkpoint_feature_cache
        self._skipping: list[Any] = []  # datasets asked to skip inputs, given them back at teardown
        self.set_trainable_layers(trainable_layers)

    def set_trainable_layers(self, trainable_layers: Sequence[str | int] | None) -> None:
        """(Re)choose the finetuned layers, e.g. from a finetuning profile, before training starts."""
        granularity = self.hparams.granularity
        self.trainable_names = resolve_layers(self.backbone, trainable_layers, granularity)
        self.trainable_modules = freeze_except(self.backbone, self.trainable_names)
        self.start = self.chain.start_of(self.trainable_names)
        if self.cache_frozen_features and isinstance(self.backbone, HFEncoder):
            raise ValueError("cache_frozen_features=true does not support Hugging Face models: their token states depend on each batch's padding")
        self.hparams.trainable_layers = list(self.trainable_names)
        self.caches: dict[str, FeatureCache] = {}  # "train", "val0", "val1", ...
        self._restored: dict[str, FeatureCache] = {}  # from a checkpoint, bound to a dataset when fit meets one
        self.teardown("fit")  # datasets told to skip inputs would now meet an empty cache
        self.train(self.training)

    # -- freezing -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> SubTuningModule:
        super().train(mode)
        frozen_eval(self.backbone, self.trainable_modules, mode)
        return self

    def setup(self, stage: str) -> None:
        if not self.cache_frozen_features or stage != "fit":
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "deterministic_train_transform"):
            raise ValueError("cache_frozen_features=true needs a zoo datamodule (it checks deterministic_train_transform and with_index)")
        if not dm.deterministic_train_transform:
            raise ValueError(
                f"cache_frozen_features=true but {type(dm).__name__}.deterministic_train_transform is False "
                "(random augmentation would make cached features stale): set data augment: false or cache_frozen_features: false"
            )
        if not getattr(dm, "with_index", False):
            raise ValueError(f"cache_frozen_features=true needs sample indices: set with_index: true on {type(dm).__name__}")

    # -- forward ------------------------------------------------------------------------
    def features(self, x: Any) -> torch.Tensor:
        """Pooled features: the frozen prefix without autograd, then the suffix."""
        with torch.no_grad():
            h, ctx = self.chain.prefix(x, self.start)
        return self.chain.suffix(h, ctx, x, self.start)

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.features(x))

    def _uncached_prefix(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h, (rest, kwargs) = self.chain.prefix(x, self.start)
        if rest or kwargs:
            raise RuntimeError("cache_frozen_features: the first trainable layer takes extra inputs, which cannot be cached")
        return h

    def cached_prefix(self, x: Any, index: torch.Tensor, split: str = "train") -> torch.Tensor:
        """The frozen prefix's output for samples ``index`` of ``split``, computed only for samples not seen before."""
        return self.caches.setdefault(split, FeatureCache()).lookup(index, x, self._uncached_prefix)

    def _cached_logits(self, batch: Any, split: str) -> torch.Tensor:
        """Logits of an ``(x, y, index)`` batch: cached prefix outputs, then the suffix and the head."""
        x = self.unpack_batch(batch)[0]
        h = self.cached_prefix(x, batch[2], split)
        return self.head(self.chain.suffix(h, ((), {}), x, self.start))

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.cache_frozen_features:
            return super().training_loss(batch)
        if len(batch) < 3:
            raise ValueError("cache_frozen_features=true needs batches (x, y, index): set with_index: true on the datamodule")
        logits, y = self._cached_logits(batch, "train"), batch[1]
        return self.criterion(logits, y), logits, y

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        if not self.cache_frozen_features or len(batch) < 3:
            return super().validation_step(batch, batch_idx)
        return self._eval_step(batch, self.val_metrics, "val", self._cached_logits(batch, f"val{dataloader_idx}"))

    # -- one cache per dataset; cached epochs skip the inputs -----------------------------------
    @staticmethod
    def _loaders(loaders: Any) -> list[Any]:
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    def _check_source(self, loader: Any, split: str) -> None:
        """A split whose loader now reads another dataset (e.g. ``validate`` on new data) gets that dataset's
        cache: a new one, or the one another split already keeps for the same dataset object."""
        dataset = getattr(loader, "dataset", None)
        if split in self.caches and self.caches[split].source is dataset:
            return
        restored = self._restored.pop(split, None)
        if restored is not None and restored.source is None and self.trainer.state.fn == "fit" and restored.dataset_len == getattr(dataset, "__len__", lambda: None)():
            restored.source = dataset  # resuming fit: the split's data, as checked by its size
            self.caches[split] = restored
            return
        shared = next((c for c in self.caches.values() if dataset is not None and c.source is dataset), None)
        self.caches[split] = shared or FeatureCache(dataset)

    def _skip_cached_inputs(self, loader: Any, split: str) -> None:
        """Tell ``loader``'s dataset which samples are cached: it stops loading their inputs."""
        dataset = getattr(loader, "dataset", None)
        cache = self.caches.get(split)
        if hasattr(dataset, "skip_cached") and cache is not None and cache.placeholder is not None:
            dataset.skip_cached(cache.filled.to("cpu", copy=True), cache.placeholder)  # a snapshot
            if all(d is not dataset for d in self._skipping):
                self._skipping.append(dataset)

    def on_train_start(self) -> None:  # a run resumed mid-epoch gets no on_train_epoch_start before its first batch
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        if self.cache_frozen_features:
            self._check_source(self.trainer.train_dataloader, "train")

    def on_train_epoch_end(self) -> None:
        if self.cache_frozen_features:
            self._skip_cached_inputs(self.trainer.train_dataloader, "train")

    def on_validation_epoch_start(self) -> None:
        if self.cache_frozen_features:
            for k, loader in enumerate(self._loaders(self.trainer.val_dataloaders)):
                self._check_source(loader, f"val{k}")

    def on_validation_epoch_end(self) -> None:
        if self.cache_frozen_features:
            for k, loader in enumerate(self._loaders(self.trainer.val_dataloaders)):
                self._skip_cached_inputs(loader, f"val{k}")

    # -- the cache in checkpoints -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's filled rows (a collective under DDP: every rank saves, rank 0's file keeps all)."""
        super().on_save_checkpoint(checkpoint)
        if not (self.cache_frozen_features and self.checkpoint_feature_cache):
            return
        unique = list({id(c): c for c in self.caches.values()}.values())
        state = {"start": self.start, "splits": {k: unique.index(c) for k, c in self.caches.items()}, "caches": [c.state() for c in unique]}
        checkpoint[_CACHE_KEY] = {"ranks": gather_object(state)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep this rank's saved rows (all ranks' under another world size) until ``fit`` meets the split's data."""
        super().on_load_checkpoint(checkpoint)
        self._restored = {}
        saved = checkpoint.get(_CACHE_KEY)
        if not (self.cache_frozen_features and saved):
            return
        world = rank_and_world()[1]
        ranks = [saved["ranks"][self.global_rank]] if len(saved["ranks"]) == world else saved["ranks"]
        if any(r["start"] != self.start for r in ranks):
            return  # another frozen prefix: the saved features do not apply
        unique: dict[int, FeatureCache] = {}
        for split in ranks[0]["splits"]:
            i = ranks[0]["splits"][split]
            unique.setdefault(i, FeatureCache.from_states([r["caches"][r["splits"][split]] for r in ranks if split in r["splits"]]))
            self._restored[split] = unique[i]

    def teardown(self, stage: str) -> None:
        """Datasets load every input again (the datamodule also resets them at its own teardown)."""
        for dataset in self._skipping:
            dataset.skip_cached(None)
        self._skipping.clear()


class MultiTaskSubTuned(nn.Module):
    """Several SubTuned models of one pretrained backbone as one network.

    The frozen trunk runs once up to the earliest first-finetuned layer; each task then branches
    at its own first finetuned layer (tasks branching at the same layer share everything before
    it) and runs its finetuned blocks, the shared frozen blocks between them, the tail and its
    head. ``forward`` returns each task's logits (a list, or a dict for a mapping of tasks) and
    equals running each model alone.

    Example::

        multi = MultiTaskSubTuned({"fmnist": load_zoo_module("a.ckpt"), "digits": load_zoo_module("b.ckpt")})
        logits = multi(images)   # {"fmnist": ..., "digits": ...}
    """

    def __init__(self, tasks: Sequence[SubTuningModule] | Mapping[str, SubTuningModule]):
        super().__init__()
        self.keys = list(tasks.keys()) if isinstance(tasks, Mapping) else None
        models = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
        if not models:
            raise ValueError("MultiTaskSubTuned needs at least one SubTuningModule")
        for m in models:
            if not isinstance(m, SubTuningModule):
                raise ValueError(f"MultiTaskSubTuned takes SubTuningModule models, got {type(m).__name__}")
        names = models[0].chain.names
        for k, m in enumerate(models):
            if m.chain.names != names:
                raise ValueError(f"task {k} has a different backbone architecture ({type(m.chain.root).__name__}) than task 0")
        self._check_shared(models)
        self.chain = models[0].chain  # prefix and tail are frozen in every task
        self.trunk = models[0].backbone
        # A frozen copy of every block that some task leaves frozen, shared by all tasks that do.
        self.shared = [next((m.chain.layers[i] for m in models if not _covered(n, m.trainable_names)), None) for i, n in enumerate(names)]
        self.task_layers = [[m.chain.layers[i] if _covered(n, m.trainable_names) else self.shared[i] for i, n in enumerate(names)] for m in models]
        self.shared_blocks = nn.ModuleList(b for b in self.shared if b is not None)
        self.branches = nn.ModuleList(nn.ModuleList(m.trainable_modules) for m in models)
        self.heads = nn.ModuleList(m.head for m in models)
        self.starts = [m.start for m in models]
        self.eval()

    @staticmethod
    def _check_shared(models: list[SubTuningModule]) -> None:
        first: dict[str, tuple[int, torch.Tensor]] = {}
        for k, m in enumerate(models):
            root = m.chain.root
            for name, t in [*root.named_parameters(), *root.named_buffers()]:
                if _covered(name, m.trainable_names):
                    continue
                if name not in first:
                    first[name] = (k, t)
                elif not torch.equal(t, first[name][1]):
                    raise ValueError(f"tasks {first[name][0]} and {k} do not share the frozen backbone: {name} differs (were they finetuned from the same weights?)")

    def forward(self, x: Any) -> list[torch.Tensor] | dict[str, torch.Tensor]:
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        outputs: list[torch.Tensor | None] = [None] * len(order)
        pos = self.starts[order[0]]
        h, ctx = self.chain.prefix(x, pos)
        for t in order:
            h = self.chain.run(h, ctx, pos, self.starts[t], self.shared)  # advance the shared trunk to this task's branch
            pos = self.starts[t]
            outputs[t] = self.heads[t](self.chain.suffix(h, ctx, x, pos, self.task_layers[t]))
        return dict(zip(self.keys, outputs)) if self.keys is not None else outputs


def greedy_select(
    layers: Sequence[str],
    score: Callable[[tuple[str, ...]], float],
    k: int | None = None,
    epsilon: float = 0.01,
    start: str = "head",
    profile: Mapping[str, float] | None = None,
) -> tuple[tuple[str, ...], float, list[dict[str, Any]]]:
    """The paper's greedy layer selection.

    ``start="head"`` begins from no layer (the head alone), ``"best"`` from the profile's best
    layer, ``"all"`` from every layer (then each round *removes* a layer). Each round scores every
    one-layer change of the current set with ``score`` and keeps the best; it stops at ``k``
    layers, when no change is left, or when the
    round's best accuracy falls below the best so far minus ``epsilon``.
    ``k`` is the largest set size (``head``/``best``) or the smallest (``all``).

    Returns ``(best set, its accuracy, history)``; the best set is the smallest among the
    highest-scoring sets seen. ``history`` has one row per scored set.
    """
    if start not in ("head", "best", "all"):
        raise ValueError(f"start={start!r}: expected 'head', 'best' or 'all'")
    if k is not None and k < 1:
        raise ValueError(f"k={k}: expected a positive number of layers or null")
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon}: expected a non-negative number")
    order = {n: i for i, n in enumerate(layers)}
    if start == "best":
        if not profile:
            raise ValueError("start='best' needs the finetuning profile (accuracy per layer)")
        current = (max(layers, key=lambda n: profile[n]),)
    else:
        current = tuple(layers) if start == "all" else ()
    history: list[dict[str, Any]] = []
    memo: dict[tuple[str, ...], float] = {}

    def evaluate(s: tuple[str, ...], rnd: int) -> float:
        if s not in memo:
            memo[s] = float(score(s))
            history.append({"round": rnd, "layers": s, "val_acc": memo[s]})
        return memo[s]

    def done() -> bool:
        if k is None:
            return False
        return len(current) <= k if start == "all" else len(current) >= k

    best_set, best = current, evaluate(current, 0)
    rounds = 0
    while not done():
        if start == "all":
            options = [tuple(n for n in current if n != drop) for drop in current]
        else:
            options = [tuple(sorted(current + (n,), key=order.__getitem__)) for n in layers if n not in current]
        if not options:
            break
        rounds += 1
        scores = [(evaluate(s, rounds), s) for s in options]
        acc, chosen = max(scores, key=lambda t: t[0])
        if acc < best - epsilon:
            break
        current = chosen
        if acc > best or (acc == best and len(chosen) < len(best_set)):
            best_set, best = chosen, acc
    return best_set, best, history
