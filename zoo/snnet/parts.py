"""The pieces of an anchor a stitch is made of, for every family :mod:`zoo.families` describes with a ``layout``.

A stitch runs its front anchor's ``stem`` (:func:`embed`), some of its blocks, a stitching layer, the end anchor's
blocks and ``tail`` (:func:`finish`). The family says where those are: ViT (tokens ``NLC``, one stage), ResNet
(``NCHW``) and Swin (``NHWC``; a stage's ``downsample`` runs with its first block, see :func:`anchor_units`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from zoo import families

SUPPORTED_FAMILIES = ("vit", "resnet", "swin")  # zoo.families families whose blocks SN-Net stitches
VIT_PARTS = ("patch_embed", "norm", "forward_head", "_pos_embed")  # what a ViT stitch uses besides the blocks
STEM = ("patch_embed", "patch_drop", "norm_pre", "pos_drop")  # ViT modules of the stem (``_pos_embed`` uses ``pos_drop``)


def family(backbone: nn.Module) -> families.Family:
    return families.family_of(backbone, "SN-Net")


def check_anchor(backbone: nn.Module, label: str) -> None:
    """Fail unless ``backbone`` is of a family SN-Net stitches (:mod:`zoo.families`), with the parts a stitch uses."""
    fam = families.find_family(backbone)
    if fam is None or fam.name not in SUPPORTED_FAMILIES:
        what = (f"a model of the {fam.name!r} family" if fam is not None
                else f"of no known model family (known: {[f.name for f in families.FAMILIES]})")
        raise ValueError(
            f"{label} is not a stitchable block sequence: it is {what}. SN-Net stitches the blocks of the "
            "vit family (timm VisionTransformer-style models: patch_embed, blocks, norm, forward_head, e.g. timm/vit_*, "
            "timm/deit_*), the resnet family (timm ResNet) and the swin family (timm SwinTransformer)."
        )
    missing = [p for p in (VIT_PARTS if fam.name == "vit" else fam.stem + fam.tail + ("forward_head",)) if not hasattr(backbone, p)]
    if missing:
        raise ValueError(f"{label} is not a stitchable {fam.name}: it lacks {missing}, which SN-Net's stitches use")


def anchor_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The blocks of an anchor in forward order, where :mod:`zoo.families` says they are."""
    root = families.root_of(backbone)
    return [root.get_submodule(name) for name, _ in families.blocks(backbone)]


def anchor_units(backbone: nn.Module) -> list[nn.Module]:
    """The blocks as a stitch runs them: a stage's first block preceded by the stage's ``stage_entry`` (Swin's
    ``downsample``), so that running units ``a..b`` runs the anchor from block ``a`` to ``b``. Same modules, not copies."""
    return units_of(backbone, [name for name, _ in families.blocks(backbone)], unit_entries(backbone))


def units_of(backbone: nn.Module, names: list[str], entries: dict[int, str]) -> list[nn.Module]:
    """:func:`anchor_units` from the block names and :func:`unit_entries` (looked up once by the caller)."""
    root = families.root_of(backbone)
    units = [root.get_submodule(n) for n in names]
    for i, entry in entries.items():
        units[i] = nn.Sequential(root.get_submodule(entry), units[i])
    return units


def stage_depths(backbone: nn.Module) -> list[int]:
    """Blocks per stage (ViT: one stage of all blocks; its registry lists each block as its own stage)."""
    if family(backbone).layout == "NLC":
        return [len(families.blocks(backbone))]
    depths: dict[str, int] = {}
    for _, stage in families.blocks(backbone):
        depths[stage] = depths.get(stage, 0) + 1
    return list(depths.values())


def embed(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features entering block 0 (ViT: patch embedding, prefix tokens, position embedding; ResNet: the stem convs)."""
    for name in family(backbone).stem:
        x = getattr(backbone, name)(x)
    return x


def finish(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits from the features leaving the last block (final norm, pooling, head)."""
    return head(families.features(backbone, x))


def channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` with its channels on the last axis (``NCHW`` -> ``NHWC``; tokens and ``NHWC`` unchanged)."""
    return x.movedim(1, -1) if layout == "NCHW" else x


def from_channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.movedim(-1, 1) if layout == "NCHW" else x


def input_shape(backbone: nn.Module) -> tuple[int, ...]:
    """``(channels, height, width)`` of one input image: a ViT/Swin's fixed ``img_size``, else the timm config's size."""
    pe = getattr(backbone, "patch_embed", None)
    conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))  # the first conv reads the image
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return (conv.in_channels, *pe.img_size)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return (conv.in_channels, *tuple(cfg.get("input_size", (3, 224, 224)))[1:])


def anchor_label(name: str, backbone: nn.Module) -> str:
    return f"{name}(w{backbone.num_features}x{len(families.blocks(backbone))})"


def shape_info(backbone: nn.Module) -> tuple:
    """ViT anchors: what must agree for tokens to map one to one (image size, patch size, channels, prefix tokens)."""
    pe = backbone.patch_embed
    return tuple(pe.img_size), tuple(pe.patch_size), pe.proj.in_channels, backbone.num_prefix_tokens


def shell(backbone: nn.Module, part: str) -> nn.Module:
    """A shallow copy of a backbone keeping only its ``stem`` (embedding) or its ``tail`` (final norm, pooling)."""
    fam = family(backbone)
    stem = STEM + fam.stem
    shell = copy.copy(backbone)
    holders = tuple({name.split(".")[0] for name, _ in families.blocks(backbone)})  # "blocks" for a timm ViT
    keep = (lambda n: n in stem) if part == "stem" else (lambda n: n not in stem + holders)
    shell._modules = {n: (m if keep(n) else nn.Identity()) for n, m in backbone._modules.items()}
    shell._parameters = dict(backbone._parameters) if part == "stem" else {n: None for n in backbone._parameters}
    return shell


def unit_entries(backbone: nn.Module) -> dict[int, str]:
    """Block index -> the ``stage_entry`` submodule run before it (the first block of each stage; Swin's ``downsample``)."""
    fam = family(backbone)
    if not fam.stage_entry:
        return {}
    out, seen = {}, set()
    for i, (_, stage) in enumerate(families.blocks(backbone)):
        if stage not in seen:
            seen.add(stage)
            out[i] = f"{stage}.{fam.stage_entry}"
    return out


@torch.no_grad()
def probe(backbone: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes (channels last, no batch) of the features entering each block of ``backbone`` and, last, leaving the last."""
    was_training = backbone.training
    backbone.eval()
    layout, h = family(backbone).layout, embed(backbone, x)
    shapes = [tuple(channels_last(h, layout).shape[1:])]
    for unit in anchor_units(backbone):
        h = unit(h)
        shapes.append(tuple(channels_last(h, layout).shape[1:]))
    backbone.train(was_training)
    return shapes


def same_size_stages(front: nn.Module, end: nn.Module, front_shapes: list, end_shapes: list) -> list[bool]:
    """Per stage (up to the shorter), whether both anchors' blocks of that stage output feature maps of one size."""
    out, fd, ed = [], stage_depths(front), stage_depths(end)
    for s in range(min(len(fd), len(ed))):
        out.append(front_shapes[sum(fd[:s + 1])][:-1] == end_shapes[sum(ed[:s + 1])][:-1])
    return out
