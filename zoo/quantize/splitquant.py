"""SplitQuant: split outlier-heavy Linear layers into three layers whose outputs sum to the original's.

Song & Lin, "SplitQuant: Layer Splitting for Low-Bit Neural Network Quantization" (2025, arXiv 2501.12428): the
weights (and, separately, the biases) of a layer are clustered by k-means (k = 3) into a lower, a middle and an upper
cluster; the layer becomes three layers of the same shape, each holding its cluster's values and zeros elsewhere,
whose outputs are summed. The function is unchanged (zeros are exact in symmetric int8), and each part quantises
with a narrower range: the bulk of the weights no longer shares its scale with the outliers.

:class:`SplitQuant` is a surgery applied before :class:`zoo.quantize.Quantize` (list it first under ``surgery:``, or
apply it before quantising): the three parts are plain ``nn.Linear`` layers, so every scheme quantises them.
``undo`` merges them back into one ``nn.Linear`` (their sum).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from zoo.surgery import Surgery


def kmeans_1d(values: torch.Tensor, k: int = 3, iters: int = 50) -> torch.Tensor:
    """Cluster labels ``0..k-1`` of the scalars ``values``, ordered by centroid (lower, middle, upper). Lloyd's
    algorithm from centroids at the min, median and max (deterministic)."""
    x = values.detach().flatten().double()
    if x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.long)
    centroids = torch.quantile(x, torch.linspace(0, 1, k, dtype=x.dtype)) if x.numel() <= 1 << 24 else \
        x.sort().values[torch.linspace(0, x.numel() - 1, k).long()]
    labels = torch.zeros_like(x, dtype=torch.long)
    for _ in range(iters):
        new = (x[:, None] - centroids[None]).abs().argmin(1)
        for j in range(k):
            members = x[new == j]
            if members.numel():
                centroids[j] = members.mean()
        if torch.equal(new, labels):
            break
        labels = new
    order = torch.argsort(torch.argsort(centroids))  # cluster j -> its rank by centroid
    return order[labels].reshape(values.shape)


def peak_ratio(weight: torch.Tensor) -> float:
    """``max |w| / std(w)``: how far the largest weight sits from the bulk (about 3-4 for Gaussian weights)."""
    w = weight.detach().float()
    return float(w.abs().max() / w.std().clamp_min(1e-12))


class SplitLinear(nn.Module):
    """Three ``nn.Linear`` parts (lower, middle, upper clusters) whose outputs are summed."""

    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, parts[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parts[0](x)
        for part in self.parts[1:]:
            out = out + part(x)
        return out

    @classmethod
    @torch.no_grad()
    def split(cls, layer: nn.Linear, k: int = 3) -> "SplitLinear":
        w_labels = kmeans_1d(layer.weight, k)
        b_labels = kmeans_1d(layer.bias, k) if layer.bias is not None else None
        parts = []
        for j in range(k):
            part = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device=layer.weight.device, dtype=layer.weight.dtype)
            part.weight.copy_(torch.where(w_labels == j, layer.weight, 0))
            part.weight.requires_grad_(layer.weight.requires_grad)
            if layer.bias is not None:
                part.bias.copy_(torch.where(b_labels == j, layer.bias, 0))
                part.bias.requires_grad_(layer.bias.requires_grad)
            parts.append(part)
        return cls(parts)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """One ``nn.Linear``: the sum of the parts (dequantised first where they were quantised)."""
        first = self.parts[0]
        bias = first.bias is not None
        layer = nn.Linear(self.in_features, self.out_features, bias=bias, device=first.weight.device)
        layer.weight.copy_(sum(_plain(p.weight) for p in self.parts))
        if bias:
            layer.bias.copy_(sum(_plain(p.bias) for p in self.parts))
        layer.weight.requires_grad_(first.weight.requires_grad)
        return layer


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A float tensor (a torchao int8 weight dequantised)."""
    return t.dequantize().float() if hasattr(t, "qdata") else t.detach().float()


class SplitQuant(Surgery):
    """Split the backbone's outlier-heavy ``nn.Linear`` layers into lower/middle/upper cluster layers (see module).

    Args:
        layers: globs of layer names to consider (default every ``nn.Linear``).
        exclude: globs left alone.
        min_peak_ratio: split only layers whose ``max|w| / std(w)`` is at least this (0: every chosen layer).
        k: clusters (the paper's 3).
    """

    def __init__(self, layers: list[str] | None = None, exclude: list[str] = (), min_peak_ratio: float = 0.0, k: int = 3):
        if k < 2:
            raise ValueError(f"k={k}: splitting needs at least 2 clusters (the paper uses 3)")
        if min_peak_ratio < 0:
            raise ValueError(f"min_peak_ratio={min_peak_ratio}: expected a ratio >= 0")
        self.layers = None if layers is None else list(layers)
        self.exclude = list(exclude)
        self.min_peak_ratio = min_peak_ratio
        self.k = k
        self.split_layers: list[str] = []

    def select(self, model: nn.Module) -> list[str]:
        names = []
        for name, module in model.named_modules():
            if type(module) is not nn.Linear or any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            if self.layers is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.layers):
                continue
            if peak_ratio(module.weight) >= self.min_peak_ratio:
                names.append(name)
        if self.layers is not None and not names:
            linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
            raise ValueError(f"SplitQuant layers={self.layers}: no nn.Linear matches (with min_peak_ratio={self.min_peak_ratio}); "
                             f"the model's Linear layers: {', '.join(linears[:8])}{' ...' if len(linears) > 8 else ''}")
        return names

    def transform(self, model: nn.Module) -> nn.Module:
        self.split_layers = self.select(model)
        for name in self.split_layers:
            _set(model, name, SplitLinear.split(model.get_submodule(name), self.k))
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        for name in self.split_layers:
            _set(model, name, model.get_submodule(name).merge())
        self.split_layers = []
        return model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
