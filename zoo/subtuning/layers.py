"""Which layers SubTuning can finetune, and :class:`Freeze`: the surgery that freezes all the others.

Candidate layers come from :mod:`zoo.families` (names relative to the backbone; for Hugging Face models, to
the wrapped ``HFEncoder.model``):

==================  ======================  ======================
family              ``granularity="block"``  ``granularity="stage"``
==================  ======================  ======================
timm ViT            ``blocks.i``             ``blocks.i``
timm ResNet         ``layerX.Y``             ``layerX``
timm EfficientNet   ``blocks.i.j``           ``blocks.i``
HF BERT-like        ``encoder.layer.i``      ``encoder.layer.i``
HF Llama-like       ``layers.i``             ``layers.i``
HF GPT-2            ``h.i``                  ``h.i``
==================  ======================  ======================
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from zoo import families
from zoo.surgery import Surgery, frozen_names, restore_trainability

GRANULARITIES = ("block", "stage")


def backbone_of(model: nn.Module) -> nn.Module:
    """``model.backbone`` for a zoo module, else ``model`` itself."""
    return model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model


def candidate_layers(model: nn.Module, granularity: str = "block") -> list[str]:
    """Names of the layers SubTuning can finetune, in forward order (see the module docstring).

    ``model`` is a backbone from :func:`zoo.backbones.build_backbone` or a zoo module with a ``backbone``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
    backbone = backbone_of(model)
    families.family_of(backbone, who="SubTuning")  # an unknown family fails with the known ones
    names = [b if granularity == "block" else s for b, s in families.blocks(backbone)]
    return list(dict.fromkeys(names))


def resolve_layers(backbone: nn.Module, trainable_layers: Sequence[str | int] | None, granularity: str = "block") -> list[str]:
    """Names (or indices into :func:`candidate_layers`) -> names in forward order; bad ones fail with the valid list."""
    valid = candidate_layers(backbone, granularity)
    names: list[str] = []
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


def covered(name: str, trainable: Sequence[str]) -> bool:
    """Whether the parameter/module ``name`` lies inside one of the ``trainable`` layers."""
    return any(name == t or name.startswith(t + ".") for t in trainable)


def freeze_except(backbone: nn.Module, trainable: Sequence[str]) -> list[nn.Module]:
    """Freeze every parameter of ``backbone`` outside the named layers (and unfreeze those inside); return the layers."""
    root = families.root_of(backbone)
    for name, p in root.named_parameters():
        p.requires_grad_(covered(name, trainable))
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


class Freeze(Surgery):
    """SubTuning's surgery: finetune ``trainable_layers`` of the backbone, freeze every other parameter.

    ``undo`` gives back the trainability each parameter had before. A zoo module whose surgery holds a
    ``Freeze`` (:class:`~zoo.subtuning.SubTuningModule`, every :mod:`zoo.continual` module) also runs the
    frozen prefix without autograd, keeps the frozen part in eval mode and, with ``cache_frozen_features``,
    caches the prefix's outputs per sample (see :class:`~zoo.subtuning.cache.FrozenPrefix`).

    Args:
        trainable_layers: names from :func:`candidate_layers` or indices into it; empty or ``null``: none
            (the head alone trains: a linear probe).
        granularity: ``block`` or ``stage`` (ResNet stages ``layerX``, EfficientNet stages ``blocks.i``).
        cache_frozen_features: the module caches the frozen prefix's output of every training and validation
            sample (keyed by the batch's ``index``: needs ``with_index: true`` on the datamodule).
        checkpoint_feature_cache: checkpoints keep the cache's filled rows (exact resume; bigger checkpoints).
        cache_device: where the cached prefix outputs live (:func:`zoo.subtuning.cache.cache_placement`): ``auto``
            (on the computing device up to 1 GiB, else CPU memory), ``cpu`` (pinned when training on a GPU) or a device.

    YAML (on any zoo module)::

        surgery:
          - class_path: zoo.subtuning.Freeze
            init_args: {trainable_layers: [blocks.10, blocks.11], cache_frozen_features: true}
    """

    def __init__(self, trainable_layers: list[str | int] | None = None, granularity: str = "block",
                 cache_frozen_features: bool = False, checkpoint_feature_cache: bool = True, cache_device: str = "auto"):
        from zoo.subtuning.cache import cache_placement

        cache_placement(cache_device, "cpu")  # a bad name fails here, naming it
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
        if trainable_layers is not None and not isinstance(trainable_layers, (list, tuple)):
            raise ValueError(f"trainable_layers={trainable_layers!r}: expected a list of layer names or indices")
        self.trainable_layers = None if trainable_layers is None else list(trainable_layers)
        self.granularity = granularity
        self.cache_frozen_features = bool(cache_frozen_features)
        self.checkpoint_feature_cache = bool(checkpoint_feature_cache)
        self.cache_device = cache_device
        self.frozen_before: set[str] | None = None

    def names(self, backbone: nn.Module) -> list[str]:
        """The trainable layers' names for ``backbone`` (checked against its candidate layers)."""
        return resolve_layers(backbone, self.trainable_layers, self.granularity)

    def transform(self, model: nn.Module) -> nn.Module:
        names = self.names(model)
        if self.frozen_before is None:
            self.frozen_before = frozen_names(model)
        freeze_except(model, names)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        restore_trainability(model, self.frozen_before)
        self.frozen_before = None
        return model
