"""SN-Net's parts: stitching layers, stitches and their positions, the ViT pieces a stitch is made of."""

from __future__ import annotations

import copy
import math
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import sdpa_flop_count

from zoo import families
from zoo.snnet.space import StitchPath, map_block, window_positions  # noqa: F401 (re-exported)

SUPPORTED_FAMILIES = ("vit",)  # zoo.families families whose blocks SN-Net stitches
VIT_PARTS = ("patch_embed", "norm", "forward_head", "_pos_embed")  # what a stitch uses besides the blocks


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP counter misses the CPU kernel of scaled_dot_product_attention; count it like the GPU ones.
FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


class StitchingLayer(nn.Module):
    """A linear map between two anchors' widths, applied to every token.

    With ``rank > 0`` (SN-Netv2's LoRA stitching) the least-squares ``weight`` is frozen and a
    rank-``rank`` update ``scaling * lora_b @ lora_a`` is trained; in eval mode the update is merged
    into the weight, so the layer is one plain linear map.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 0, alpha: float = 1.0):
        super().__init__()
        if rank < 0:
            raise ValueError(f"lora rank={rank}: expected 0 (no LoRA) or a positive integer")
        self.rank = rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if rank:
            self.weight.requires_grad_(False)
            self.lora_a = nn.Parameter(torch.empty(rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.scaling = alpha / rank

    def merged_weight(self) -> torch.Tensor:
        if not self.rank:
            return self.weight
        return self.weight + self.scaling * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank and self.training:
            return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)
        return F.linear(x, self.merged_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's eval-mode map (LoRA merged)."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            linear.bias.copy_(self.bias)
        return linear


def check_anchor(backbone: nn.Module, label: str) -> None:
    """Fail unless ``backbone`` is of a family SN-Net stitches (:mod:`zoo.families`), with the parts a stitch uses."""
    family = families.find_family(backbone)
    if family is None or family.name not in SUPPORTED_FAMILIES:
        what = (f"a model of the {family.name!r} family" if family is not None
                else f"of no known model family (known: {[f.name for f in families.FAMILIES]})")
        raise ValueError(
            f"{label} is not a ViT-like block sequence: it is {what}. SN-Net stitches the blocks of the "
            f"{' / '.join(SUPPORTED_FAMILIES)} family (timm VisionTransformer-style models: patch_embed, blocks, norm, "
            "forward_head), e.g. timm/vit_*, timm/deit_*."
        )
    missing = [p for p in VIT_PARTS if not hasattr(backbone, p)]
    if missing:
        raise ValueError(f"{label} is not a ViT-like block sequence: it lacks {missing}, which SN-Net's stitches use")


def anchor_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The blocks of an anchor in forward order, where :mod:`zoo.families` says they are."""
    root = families.root_of(backbone)
    return [root.get_submodule(name) for name, _ in families.blocks(backbone)]


def embed(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens entering block 0 of a timm ViT (patch embedding, prefix tokens, position embedding)."""
    x = backbone.patch_embed(x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    return backbone.norm_pre(x)


def finish(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits from the tokens leaving the last block (final norm, pooling, head)."""
    return head(backbone.forward_head(backbone.norm(x)))


def anchor_label(name: str, backbone: nn.Module) -> str:
    return f"{name}(w{backbone.embed_dim}x{len(anchor_blocks(backbone))})"


def shape_info(backbone: nn.Module) -> tuple:
    pe = backbone.patch_embed
    return tuple(pe.img_size), tuple(pe.patch_size), pe.proj.in_channels, backbone.num_prefix_tokens



STEM = ("patch_embed", "patch_drop", "norm_pre", "pos_drop")


def shell(backbone: nn.Module, part: str) -> nn.Module:
    """A shallow copy of a ViT backbone keeping only its ``stem`` (embedding) or its ``tail`` (final norm, pooling)."""
    shell = copy.copy(backbone)
    holders = tuple({name.split(".")[0] for name, _ in families.blocks(backbone)})  # "blocks" for a timm ViT
    keep = (lambda n: n in STEM) if part == "stem" else (lambda n: n not in STEM + holders)
    shell._modules = {n: (m if keep(n) else nn.Identity()) for n, m in backbone._modules.items()}
    shell._parameters = dict(backbone._parameters) if part == "stem" else {n: None for n in backbone._parameters}
    return shell


class StitchedViT(nn.Module):
    """One stitch as a plain module: ``stem`` embedding, ``stages`` (blocks and linear stitching layers), ``tail`` norm/pool, ``head``."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, tail: nn.Module, head: nn.Module, description: str = ""):
        super().__init__()
        self.stem, self.stages, self.tail, self.head = stem, stages, tail, head
        self.description = description

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finish(self.tail, self.head, self.stages(embed(self.stem, x)))


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` minimising ``||x @ weight.T + bias - y||`` over flattened tokens (pseudo-inverse, float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    sol = torch.linalg.pinv(xa) @ y
    return sol[:-1].T.float(), sol[-1].float()


