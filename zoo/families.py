"""The one place that knows model families: where the blocks, attention and FFNs of a backbone live.

SubTuning (which layers can be finetuned), EMoE (which FFNs become experts), SN-Net (which blocks stitch),
distillation taps and the pruning callbacks' coverage report all ask this module, and the tests are
parametrized over :data:`FAMILIES`. Names are relative to the *root*: the backbone itself, or the wrapped
Hugging Face model of an :class:`~zoo.backbones.HFEncoder`.

==============  ======================  ===============  ============================  ==============================
family          blocks (stage)          attention        FFN (its dense layers)        built from
==============  ======================  ===============  ============================  ==============================
``vit``         ``blocks.i``            ``attn``         ``mlp`` (``mlp.fc1``,         timm VisionTransformer
                                                         ``mlp.fc2``)
``resnet``      ``layerS.j`` (layerS)   --               --                            timm ResNet
``swin``        ``layers.S.blocks.j``   ``attn``         ``mlp`` (``mlp.fc1``,         timm SwinTransformer
                (``layers.S``)                           ``mlp.fc2``)
``efficientnet`` ``blocks.i.j`` (i)     --               --                            timm EfficientNet
``bert``        ``encoder.layer.i``     ``attention``    ``intermediate``, ``output``  HF BERT-like
                                                         (``intermediate.dense``,
                                                         ``output.dense``)
``llama``       ``layers.i``            ``self_attn``    ``mlp`` (``mlp.gate_proj``,   HF Llama-like
                                                         ``mlp.up_proj``,
                                                         ``mlp.down_proj``)
``gpt2``        ``h.i``                 ``attn``         ``mlp`` (``mlp.c_fc``,        HF GPT-2
                                                         ``mlp.c_proj``; ``Conv1D``)
==============  ======================  ===============  ============================  ==============================

The FFN's dense layers are listed in data order: the input projection (Llama: the gate, then the up projection)
first, the output projection last. GPT-2's are ``Conv1D``: weights stored transposed (in x out). BERT's FFN is two
submodules of the block; ``output`` also holds the dropout, the residual and the LayerNorm after ``output.dense``,
so the FFN as *one* module (:func:`ffns`, what EMoE converts) is the whole block there.

A new family is one :class:`Family` entry in :data:`FAMILIES`. Every family's ``tail`` (what runs between the last
block and the pooling) gives :func:`features` the backbone's pooled features from its last block's output (SubTuning's
split forward pass, SN-Net's stitches). SN-Net also reads ``stem``, ``layout`` and ``stage_entry`` (how to run an anchor
piece by piece); families without a ``layout`` cannot be stitched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """How to find the parts of one model family (see the module docstring)."""

    name: str
    matches: Callable[[nn.Module, bool], bool]  # (root, wrapped by HFEncoder) -> is this family
    blocks: Callable[[nn.Module], list[tuple[str, str]]]  # root -> (block, stage) names in forward order
    attention: tuple[str, ...] = ()  # submodules of a block that are attention
    ffn: tuple[str, ...] = ()  # submodules of a block that are the FFN
    ffn_layers: tuple[str, ...] = ()  # the FFN's dense layers (relative to a block), input projection(s) first, output last
    ffn_transposed: bool = False  # those layers are HF Conv1D: weights stored transposed (in x out)
    stem: tuple[str, ...] = ()  # attributes of the root called in turn on the input to get block 0's input (SN-Net)
    tail: tuple[str, ...] = ()  # attributes of the root called in turn on the last block's output before the pooling
    layout: str = ""  # the features between blocks: "NLC" (tokens), "NCHW" or "NHWC"; "" unknown
    stage_entry: str = ""  # submodule of a stage run before its first block (Swin's ``downsample``)

    @property
    def ffn_module(self) -> str:
        """The FFN as one module, relative to a block: its FFN submodule, or ``""`` (the block itself) when the FFN
        is several submodules (BERT's ``intermediate`` + ``output``)."""
        return self.ffn[0] if len(self.ffn) == 1 else ""


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
    Family("vit", _timm("timm.models.vision_transformer.VisionTransformer"), _indexed("blocks"), ("attn",), ("mlp",),
           ("mlp.fc1", "mlp.fc2"), stem=("patch_embed", "_pos_embed", "patch_drop", "norm_pre"), tail=("norm",), layout="NLC"),
    Family("resnet", _timm("timm.models.resnet.ResNet"),
           lambda r: [(f"layer{s}.{j}", f"layer{s}") for s in range(1, 5) for j in range(len(getattr(r, f"layer{s}")))],
           stem=("conv1", "bn1", "act1", "maxpool"), layout="NCHW"),
    Family("swin", _timm("timm.models.swin_transformer.SwinTransformer"),
           lambda r: [(f"layers.{s}.blocks.{j}", f"layers.{s}") for s, stage in enumerate(r.layers) for j in range(len(stage.blocks))],
           ("attn",), ("mlp",), ("mlp.fc1", "mlp.fc2"), stem=("patch_embed",), tail=("norm",), layout="NHWC", stage_entry="downsample"),
    Family("efficientnet", _timm("timm.models.efficientnet.EfficientNet"),
           lambda r: [(f"blocks.{i}.{j}", f"blocks.{i}") for i, stage in enumerate(r.blocks) for j in range(len(stage))],
           tail=("conv_head", "bn2")),
    Family("bert", _has("encoder.layer"), _indexed("encoder.layer"), ("attention",), ("intermediate", "output"),
           ("intermediate.dense", "output.dense")),
    Family("llama", lambda r, hf: _has("layers")(r, hf) and hasattr(r, "norm"), _indexed("layers"), ("self_attn",), ("mlp",),
           ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), tail=("norm",)),
    Family("gpt2", _has("h"), _indexed("h"), ("attn",), ("mlp",), ("mlp.c_fc", "mlp.c_proj"), ffn_transposed=True, tail=("ln_f",)),
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


def features(backbone: nn.Module, hidden: torch.Tensor, inputs: Any = None, family: Family | None = None) -> torch.Tensor:
    """``backbone``'s pooled features (what it returns) from its last block's output ``hidden``: the family's ``tail``,
    then timm's ``forward_head(pre_logits=True)``, or an :class:`~zoo.backbones.HFEncoder`'s pooling over ``inputs``'
    attention mask. ``family``: the backbone's, when the caller already knows it (a forward pass need not look it up)."""
    from zoo.backbones import HFEncoder

    root = root_of(backbone)
    for name in (family or family_of(backbone)).tail:
        hidden = getattr(root, name)(hidden)
    if isinstance(backbone, HFEncoder):
        return backbone.pool(hidden, inputs)
    return root.forward_head(hidden, pre_logits=True)


def by_name(name: str) -> Family:
    """The :class:`Family` called ``name``; an unknown name fails with the known ones."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no model family {name!r}: known families are {[f.name for f in FAMILIES]}")


def ffns(backbone: nn.Module) -> list[str]:
    """Each block's FFN as one module (:attr:`Family.ffn_module`), relative to :func:`root_of`, in forward order;
    empty for a family with no FFN (CNNs)."""
    family = family_of(backbone)
    if not family.ffn:
        return []
    return [f"{block}.{family.ffn_module}".rstrip(".") for block, _ in family.blocks(root_of(backbone))]


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
