"""The one place that knows model families: where the blocks, attention and FFNs of a backbone live.

SubTuning (which layers can be finetuned), EMoE (which FFNs become experts), SN-Net (which blocks stitch),
distillation taps and the pruning callbacks' coverage report all ask this module, and the tests are
parametrized over :data:`FAMILIES`. Names are relative to the *root*: the backbone itself, or the wrapped
Hugging Face model of an :class:`~zoo.backbones.HFEncoder`.

==============  ======================  ===============  ======================  ==================
family          blocks (stage)          attention        FFN                     built from
==============  ======================  ===============  ======================  ==================
``vit``         ``blocks.i``            ``attn``         ``mlp``                 timm VisionTransformer
``resnet``      ``layerS.j`` (layerS)   --               --                      timm ResNet
``efficientnet`` ``blocks.i.j`` (i)     --               --                      timm EfficientNet
``bert``        ``encoder.layer.i``     ``attention``    ``intermediate``,       HF BERT-like
                                                         ``output``
``llama``       ``layers.i``            ``self_attn``    ``mlp``                 HF Llama-like
``gpt2``        ``h.i``                 ``attn``         ``mlp``                 HF GPT-2
==============  ======================  ===============  ======================  ==================

A new family is one :class:`Family` entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """How to find the parts of one model family (see the module docstring)."""

    name: str
    matches: Callable[[nn.Module, bool], bool]  # (root, wrapped by HFEncoder) -> is this family
    blocks: Callable[[nn.Module], list[tuple[str, str]]]  # root -> (block, stage) names in forward order
    attention: tuple[str, ...] = ()  # submodules of a block that are attention
    ffn: tuple[str, ...] = ()  # submodules of a block that are the FFN


def _timm(cls_path: str) -> Callable[[nn.Module, bool], bool]:
    def matches(root: nn.Module, hf: bool) -> bool:
        import importlib

        module, _, name = cls_path.rpartition(".")
        return not hf and isinstance(root, getattr(importlib.import_module(module), name))

    return matches


def _indexed(prefix: str) -> Callable[[nn.Module], list[tuple[str, str]]]:
    return lambda root: [(f"{prefix}.{i}", f"{prefix}.{i}") for i in range(len(root.get_submodule(prefix)))]


def _has(path: str) -> Callable[[nn.Module, bool], bool]:
    def matches(root: nn.Module, hf: bool) -> bool:
        try:
            return hf and isinstance(root.get_submodule(path), nn.ModuleList)
        except AttributeError:
            return False

    return matches


FAMILIES: tuple[Family, ...] = (
    Family("vit", _timm("timm.models.vision_transformer.VisionTransformer"), _indexed("blocks"), ("attn",), ("mlp",)),
    Family("resnet", _timm("timm.models.resnet.ResNet"),
           lambda r: [(f"layer{s}.{j}", f"layer{s}") for s in range(1, 5) for j in range(len(getattr(r, f"layer{s}")))]),
    Family("efficientnet", _timm("timm.models.efficientnet.EfficientNet"),
           lambda r: [(f"blocks.{i}.{j}", f"blocks.{i}") for i, stage in enumerate(r.blocks) for j in range(len(stage))]),
    Family("bert", _has("encoder.layer"), _indexed("encoder.layer"), ("attention",), ("intermediate", "output")),
    Family("llama", lambda r, hf: _has("layers")(r, hf) and hasattr(r, "norm"), _indexed("layers"), ("self_attn",), ("mlp",)),
    Family("gpt2", _has("h"), _indexed("h"), ("attn",), ("mlp",)),
)


def root_of(backbone: nn.Module) -> nn.Module:
    """The module the family's names are relative to (the HF model inside an ``HFEncoder``)."""
    from zoo.backbones import HFEncoder

    return backbone.model if isinstance(backbone, HFEncoder) else backbone


def family_of(backbone: nn.Module, who: str = "the zoo") -> Family:
    """The :class:`Family` of ``backbone``; an unknown model fails with the list of known families."""
    family = find_family(backbone)
    if family is None:
        raise ValueError(f"{who} does not know the layers of {type(root_of(backbone)).__name__}: known families are "
                         f"{[f.name for f in FAMILIES]} (see zoo/families.py to add one)")
    return family


def find_family(backbone: nn.Module) -> Family | None:
    from zoo.backbones import HFEncoder

    root, hf = root_of(backbone), isinstance(backbone, HFEncoder)
    return next((f for f in FAMILIES if f.matches(root, hf)), None)


def blocks(backbone: nn.Module) -> list[tuple[str, str]]:
    """``(block, stage)`` names of ``backbone``'s blocks, relative to :func:`root_of`, in forward order."""
    return family_of(backbone).blocks(root_of(backbone))


def roles(backbone: nn.Module) -> dict[str, str]:
    """Each module of the root that owns parameters -> its role: ``attention``, ``ffn``, ``block`` (norms and
    the rest of a block) or ``outside`` (stem, embeddings, final norm). Unknown families: every module is ``outside``."""
    family, root = find_family(backbone), root_of(backbone)
    parts: list[tuple[str, str]] = []
    if family is not None:
        for block, _ in family.blocks(root):
            parts += [(f"{block}.{a}", "attention") for a in family.attention]
            parts += [(f"{block}.{f}", "ffn") for f in family.ffn]
            parts.append((block, "block"))
    out = {}
    for name, module in root.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            out[name] = next((role for prefix, role in parts if name == prefix or name.startswith(prefix + ".")), "outside")
    return out
