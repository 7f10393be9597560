"""SN-Net's stitching layers, the plain module a stitch becomes, least squares (anchor pieces: :mod:`zoo.snnet.parts`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import sdpa_flop_count

from zoo.snnet.parts import (  # noqa: F401 (re-exported)
    STEM, SUPPORTED_FAMILIES, VIT_PARTS, anchor_blocks, anchor_label, channels_last, check_anchor, embed, finish, from_channels_last,
    shape_info, shell,
)
from zoo.snnet.space import StitchPath, map_block, window_positions  # noqa: F401 (re-exported)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP counter misses the CPU kernel of scaled_dot_product_attention; count it like the GPU ones.
FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


class StitchingLayer(nn.Module):
    """A linear map between two anchors' widths, applied to every token (ViT) or pixel (a 1x1 conv on feature maps).

    ``in_layout`` / ``out_layout`` (``NLC``, ``NCHW``, ``NHWC``) say where the channels are on each side, so a ResNet
    (``NCHW``) stitches into a Swin (``NHWC``). With ``rank > 0`` (SN-Netv2's LoRA stitching) the least-squares
    ``weight`` is frozen and a rank-``rank`` update ``scaling * lora_b @ lora_a`` is trained; in eval mode the update
    is merged into the weight, so the layer is one plain linear map.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 0, alpha: float = 1.0, in_layout: str = "NLC",
                 out_layout: str = "NLC"):
        super().__init__()
        if rank < 0:
            raise ValueError(f"lora rank={rank}: expected 0 (no LoRA) or a positive integer")
        self.rank, self.in_layout, self.out_layout = rank, in_layout, out_layout
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
        x = channels_last(x, self.in_layout)
        if self.rank and self.training:
            y = F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)
        else:
            y = F.linear(x, self.merged_weight(), self.bias)
        return from_channels_last(y, self.out_layout)

    def to_linear(self) -> nn.Module:
        """A plain module computing this layer's eval-mode map (LoRA merged): ``nn.Linear`` on tokens / ``NHWC``,
        a 1x1 ``nn.Conv2d`` on ``NCHW``, a :class:`ChannelLinear` between the two."""
        out_features, in_features = self.weight.shape
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        both = {self.in_layout, self.out_layout}
        plain = nn.Conv2d(in_features, out_features, 1, **kw) if both == {"NCHW"} else nn.Linear(in_features, out_features, **kw)
        with torch.no_grad():
            plain.weight.copy_(self.merged_weight().reshape(plain.weight.shape))
            plain.bias.copy_(self.bias)
        return plain if "NCHW" not in both or both == {"NCHW"} else ChannelLinear(plain, self.in_layout, self.out_layout)


class ChannelLinear(nn.Module):
    """``linear`` over the channels of feature maps between two layouts (e.g. ResNet ``NCHW`` -> Swin ``NHWC``)."""

    def __init__(self, linear: nn.Linear, in_layout: str, out_layout: str):
        super().__init__()
        self.linear, self.in_layout, self.out_layout = linear, in_layout, out_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return from_channels_last(self.linear(channels_last(x, self.in_layout)), self.out_layout)


class StitchedViT(nn.Module):
    """One stitch as a plain module: ``stem`` embedding, ``stages`` (blocks and plain stitching layers), ``tail`` norm/pool,
    ``head`` (any family of :mod:`zoo.snnet.parts`, the name kept from ViT-only days)."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, tail: nn.Module, head: nn.Module, description: str = ""):
        super().__init__()
        self.stem, self.stages, self.tail, self.head = stem, stages, tail, head
        self.description = description

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finish(self.tail, self.head, self.stages(embed(self.stem, x)))


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` minimising ``||x @ weight.T + bias - y||`` over flattened tokens (pseudo-inverse, float64;
    float32 results whatever the inputs' dtype)."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    sol = torch.linalg.pinv(xa) @ y
    return sol[:-1].T.float(), sol[-1].float()


