"""Stitching as model surgery: :class:`Anchors` (a family of models) -> :class:`Stitch` -> a :class:`StitchableNet`.

:meth:`Stitch.transform` joins the anchors into one stitchable network holding every stitch; :meth:`Stitch.undo`
merges it back into a plain network: the selected stitch alone (its blocks, the stitching layers as ``nn.Linear``
with LoRA merged, the end anchor's head), computing what the stitchable network computes with that stitch
selected. :class:`~zoo.snnet.SNNetModule` keeps the anchors as its backbone and puts ``Stitch`` first in its
surgery, so ``configure_model`` stitches and ``unload_surgery()`` gives the chosen stitch::

    net = Stitch(kernel_size=2, two_way=True)(Anchors.build(["timm/deit_tiny_patch16_224", "timm/deit_small_patch16_224"], 10))
    net.select(17)
    small = Stitch().undo(net)            # plain nn.Module of stitch 17, same outputs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from zoo.backbones import build_backbone, load_zoo_module
from zoo.snnet.layers import StitchedViT
from zoo.snnet.net import StitchableNet
from zoo.snnet.space import SPACES
from zoo.surgery import Surgery

ANCHOR_KEYS = ("model", "pretrained", "model_kwargs")


def build_anchor(spec: str | dict[str, Any], num_classes: int, pretrained: bool) -> tuple[nn.Module, nn.Module, str]:
    """``(backbone, head, name)`` of one anchor: a zoo ``.ckpt`` or a timm model name / ``{model, pretrained, model_kwargs}``
    (its own head kept when it has ``num_classes`` outputs, e.g. ImageNet anchors on ImageNet; else a fresh ``Linear``)."""
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict) or "model" not in spec or set(spec) - set(ANCHOR_KEYS):
        raise ValueError(f"anchor {spec!r}: expected a model name, a zoo .ckpt path, or a dict with keys {ANCHOR_KEYS} ('model' required)")
    name = spec["model"]
    if name.endswith(".ckpt"):
        module = load_zoo_module(name)
        backbone, head = getattr(module, "backbone", None), getattr(module, "head", None)
        if backbone is None or head is None:
            raise ValueError(f"anchor {name!r}: {type(module).__name__} has no backbone and head to stitch")
        if not isinstance(head, nn.Linear) or head.out_features != num_classes:
            head = nn.Linear(backbone.num_features, num_classes)
        return backbone, head, Path(name).stem
    kwargs = dict(spec.get("model_kwargs") or {})
    kept = _hub_with_head(name, spec.get("pretrained", pretrained), kwargs, num_classes)
    if kept is not None:
        return (*kept, name.rsplit("/", 1)[-1])
    kwargs.pop("num_classes", None)  # the model's own class count: its head is replaced
    backbone = build_backbone(name, spec.get("pretrained", pretrained), **kwargs)
    return backbone, nn.Linear(backbone.num_features, num_classes), name.rsplit("/", 1)[-1]


def _hub_with_head(name: str, pretrained: bool, kwargs: dict[str, Any], num_classes: int) -> tuple[nn.Module, nn.Linear] | None:
    """``(backbone, head)`` of a timm anchor whose own classifier has ``num_classes`` outputs (its pretrained head, kept
    as the official SN-Net does); ``None`` when the class count differs (the caller makes a fresh head)."""
    prefix, _, rest = name.partition("/")
    if prefix != "timm" or kwargs.get("checkpoint_path") or kwargs.get("pooling"):
        return None
    import timm

    if not timm.is_model(rest):
        return None  # build_backbone names the error
    cfg = timm.models.get_pretrained_cfg(rest)
    if kwargs.get("num_classes", getattr(cfg, "num_classes", None) or 1000) != num_classes:
        return None
    model = timm.create_model(rest, pretrained=pretrained, **{**kwargs, "num_classes": num_classes})
    head = model.get_classifier()
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        return None
    model.reset_classifier(0)  # the backbone returns features; the head module (and its weights) is kept apart
    return model, head


class Anchors(nn.Module):
    """The models :class:`Stitch` joins: ``backbones`` (timm ViT-like, any order) and one classification head each.

    Not a network by itself (``forward`` refuses): apply :class:`Stitch` first.
    """

    def __init__(self, backbones: list[nn.Module], heads: list[nn.Module], names: list[str] | None = None):
        super().__init__()
        if len(backbones) != len(heads) or (names is not None and len(names) != len(backbones)):
            raise ValueError(f"got {len(backbones)} backbones, {len(heads)} heads and {len(names or [])} names: one of each per anchor")
        self.backbones, self.heads = nn.ModuleList(backbones), nn.ModuleList(heads)
        self.names = list(names) if names is not None else None

    @classmethod
    def build(cls, specs: list[str | dict[str, Any]], num_classes: int, pretrained: bool = False) -> Anchors:
        """Anchors from specs: model names, zoo ``.ckpt`` paths or ``{model, pretrained, model_kwargs}`` (see :func:`build_anchor`)."""
        built = [build_anchor(spec, num_classes, pretrained) for spec in specs]
        return cls([b for b, _, _ in built], [h for _, h, _ in built], [n for _, _, n in built])

    def largest(self) -> int:
        """Index of the largest anchor (by parameters; the last one :class:`StitchableNet` sorts to)."""
        return sorted(range(len(self.backbones)), key=lambda i: sum(p.numel() for p in self.backbones[i].parameters()))[-1]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Anchors are the models to stitch, not a network: apply zoo.snnet.Stitch to them first")


class Stitch(Surgery):
    """Stitch :class:`Anchors` into a :class:`StitchableNet` (SN-Net / SN-Netv2); undo: the selected stitch as a plain module.

    Args:
        kernel_size: sliding-window size over block ids (SN-Net: 2).
        stride: sliding-window stride (SN-Net: 1).
        two_way: SN-Netv2 two-way stitching (large->small, small->large->small, large->small->large).
        interpolate_depth: map anchors of different depth by interpolation (``False``: require equal depth).
        lora_rank: SN-Netv2 low-rank updates of the stitching layers (0: plain linear stitching layers).
        lora_alpha: LoRA scaling numerator.
        space: stitching positions, ``v1`` (SN-Net windows) or ``v2`` (SN-Netv2 aligned positions, one layer each);
            default ``None``: the official one of the version, ``v2`` with ``two_way``, else ``v1``.
        nearest: stitch only neighbouring anchors (official default); ``False``: every pair and small -> medium -> large.
        eval_stitch: the stitch selected after stitching (default: the largest anchor); :meth:`undo` extracts the
            stitch selected at that time (``StitchableNet.select``, e.g. StitchSweep's best).
    """

    def __init__(self, kernel_size: int = 2, stride: int = 1, two_way: bool = False, interpolate_depth: bool = True, lora_rank: int = 0,
                 lora_alpha: float = 1.0, eval_stitch: int | None = None, space: str | None = None, nearest: bool = True):
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size={kernel_size}, stride={stride}: both must be positive integers")
        if lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank}: expected 0 (plain stitching layers) or a positive integer")
        if eval_stitch is not None and (isinstance(eval_stitch, bool) or not isinstance(eval_stitch, int) or eval_stitch < 0):
            raise ValueError(f"eval_stitch={eval_stitch!r}: expected null (the largest anchor) or a stitch id >= 0")
        self.kernel_size, self.stride, self.two_way, self.interpolate_depth = kernel_size, stride, two_way, interpolate_depth
        if space is not None and space not in SPACES:
            raise ValueError(f"space={space!r}: expected one of {SPACES} (or null: v2 with two_way, v1 without)")
        self.lora_rank, self.lora_alpha, self.eval_stitch, self.space, self.nearest = lora_rank, lora_alpha, eval_stitch, space, nearest

    def transform(self, model: nn.Module) -> StitchableNet:
        if not isinstance(model, Anchors):
            raise TypeError(f"zoo.snnet.Stitch transforms zoo.snnet.Anchors (the models to stitch), got {type(model).__name__}"
                            + (" (already stitched)" if isinstance(model, StitchableNet) else ""))
        net = StitchableNet(list(model.backbones), list(model.heads), model.names, kernel_size=self.kernel_size, stride=self.stride,
                            two_way=self.two_way, interpolate_depth=self.interpolate_depth, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                            space=self.space, nearest=self.nearest)
        net.select(net.anchor_ids[-1] if self.eval_stitch is None else self.eval_stitch)
        return net.train(model.training)

    def undo(self, model: nn.Module) -> StitchedViT:
        """The selected stitch of ``model`` as a standalone copy (:meth:`StitchableNet.extract`)."""
        if not isinstance(model, StitchableNet):
            raise TypeError(f"zoo.snnet.Stitch.undo takes the StitchableNet it made, got {type(model).__name__}")
        return model.extract(model.active)
