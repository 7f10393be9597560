"""Structured pruning with Torch-Pruning: the one implementation behind :class:`~zoo.pruning.PruneStructured` (one shot,
at build time) and :class:`callbacks.pruning.StructuredPruning` (masks during training, removal at the end of fit).

In every group of coupled layers that Torch-Pruning's dependency graph finds (Fang et al. 2023, "DepGraph"), the
channels with the smallest L2 norm go (``MetaPruner`` + ``MagnitudeImportance(p=2)``; the norm criterion of Li et al.
2017, "Pruning Filters for Efficient ConvNets"). timm attention loses whole heads. :class:`~zoo.emoe.EMoEFFN` layers,
which Torch-Pruning cannot trace, are hidden behind stand-ins and lose the lowest-norm neurons of every expert.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import Any, Iterator

import torch
from torch import nn

from zoo.emoe.layers import EMoEFFN

EXPERT_TENSORS = ("fc1_weight", "fc1_bias", "up_weight", "up_bias", "fc2_weight")  # stacked (N, m, ...): a neuron is [e, j]


def names_check(model: nn.Module, patterns: Sequence[str], what: str) -> None:
    """Fail when a pattern matches no module name of ``model``, listing the closest names."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(fnmatch(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:5]
            raise ValueError(f"{what} {pattern!r} matches no module of {type(model).__name__}; candidates: {', '.join(close)}")


def is_ignored(name: str, module: nn.Module, ignore: Sequence[str]) -> bool:
    """A module whose output channels are kept: matched by an ``ignore`` pattern, or whose own parameters are all frozen."""
    own = list(module.parameters(recurse=False))
    frozen = bool(own) and not any(p.requires_grad for p in own)
    return frozen or any(fnmatch(name, pat) for pat in ignore)


def expert_layers(model: nn.Module, ignore: Sequence[str] = ()) -> list[tuple[str, EMoEFFN]]:
    """The EMoE layers of ``model`` that are pruned (not ignored, not frozen)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EMoEFFN) and not is_ignored(n, m, ignore)]


def expert_keep(layer: EMoEFFN, sparsity: float) -> torch.Tensor:
    """``(N, m')`` indices of the neurons each expert keeps: all but its ``round(sparsity * m)`` lowest-norm ones."""
    norms = layer.neuron_norms()
    keep = norms.shape[1] - round(sparsity * norms.shape[1])
    return norms.topk(keep, dim=1).indices.sort(dim=1).values


@contextmanager
def opaque_experts(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Every EMoE layer replaced, for the duration, by a plain ``Linear(d, d_out)`` stand-in (yielded, for
    Torch-Pruning to ignore): Torch-Pruning then neither traces the experts' dispatch (slow: minutes on a tiny
    ViT) nor prunes the width that flows through them (a group holding an ignored layer is not pruned)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, EMoEFFN)]
    proxies = []
    for name, layer in layers:
        parent, _, attr = name.rpartition(".")
        proxy = nn.Linear(layer.fc1_weight.shape[-1], layer.fc2_weight.shape[-1], bias=False, device=layer.fc2_weight.device)
        setattr(model.get_submodule(parent) if parent else model, attr, proxy)
        proxies.append(proxy)
    try:
        yield proxies
    finally:
        for name, layer in layers:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer)


class KeepOutput(nn.Module):
    """``model`` followed by an ignored ``LayerNorm`` on its output: traced in its place, it keeps every group that
    reaches the output unpruned, so the output width (what a head reads) stays as it is."""

    def __init__(self, model: nn.Module, width: int):
        super().__init__()
        self.model = model
        self.sentinel = nn.LayerNorm(width)

    def forward(self, x: Any) -> torch.Tensor:
        return self.sentinel(self.model(x))


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{qkv Linear: num_heads}`` of timm-style attention modules (with ``qkv`` and ``num_heads``)."""
    return {m.qkv: m.num_heads for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")}


def meta_pruner(model: nn.Module, sparsity: float, example: Any, ignored: Sequence[nn.Module] = (), prune_heads: bool = True,
                global_pruning: bool = False, round_to: int | None = None):
    """A Torch-Pruning ``MetaPruner`` that removes ``sparsity`` of every prunable group of ``model`` by L2 norm;
    ``ignored`` modules keep their output channels; timm attention loses whole heads (``prune_heads``) or the same
    dimensions of every head. EMoE layers must be hidden first (:func:`opaque_experts`)."""
    import torch_pruning as tp

    num_heads = attention_heads(model)  # always given: q, k and v of a head then lose the same rows
    was_training = model.training
    with torch.enable_grad():  # the dependency graph is traced with autograd
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=sparsity, ignored_layers=list(ignored),
            global_pruning=global_pruning, round_to=round_to, num_heads=num_heads, prune_num_heads=prune_heads and bool(num_heads),
            prune_head_dims=not prune_heads, head_pruning_ratio=sparsity if prune_heads and num_heads else 0.0,
        )
    model.train(was_training)
    return pruner


@torch.no_grad()
def set_heads(model: nn.Module, num_heads: dict[nn.Module, int]) -> None:
    """After pruning, each attention module's ``num_heads`` / ``head_dim`` (/ ``attn_dim``) from its narrower ``qkv``.

    Narrower heads keep their attention temperature: fused attention scales by ``head_dim ** -0.5`` of the tensor it
    gets, so the old ``scale`` is folded into the query rows of ``qkv`` (or, behind a query norm, the unfused path
    with the old ``scale`` is used)."""
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Module) and m.qkv in num_heads:
            old = getattr(m, "head_dim", None)
            m.num_heads = num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
            if old is not None and old != m.head_dim and isinstance(getattr(m, "scale", None), float):
                if isinstance(getattr(m, "q_norm", None), (nn.Identity, type(None))):
                    factor, rows = m.scale * m.head_dim**0.5, m.qkv.out_features // 3
                    m.qkv.weight[:rows] *= factor
                    if m.qkv.bias is not None:
                        m.qkv.bias[:rows] *= factor
                    m.scale = m.head_dim**-0.5
                elif hasattr(m, "fused_attn"):
                    m.fused_attn = False


def output_width(model: nn.Module, example: Any) -> int:
    """The last dimension of ``model(example)`` (run in eval mode, without autograd)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(example)
    model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{type(model).__name__} returns {type(out).__name__}, not a tensor: its output width cannot be kept")
    return out.shape[-1]


@torch.no_grad()
def remove_channels(model: nn.Module, sparsity: float, example: Any, ignore: Sequence[str] = (), keep: Sequence[nn.Module] = (),
                    keep_output: bool = False, prune_heads: bool = True, global_pruning: bool = False, round_to: int | None = None) -> None:
    """Physically remove, in place, the ``sparsity`` lowest-norm channels of every group of coupled layers (heads of
    timm attention) and the ``sparsity`` lowest-norm neurons of every expert of the EMoE layers.

    ``ignore``: fnmatch patterns of module names whose output channels are kept (frozen modules always are);
    ``keep``: more such modules; ``keep_output``: keep the width of ``model``'s output. Every surviving parameter
    keeps its ``requires_grad`` (Torch-Pruning makes new, trainable parameters)."""
    experts = expert_layers(model, ignore)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with opaque_experts(model) as proxies:
        ignored = [m for n, m in model.named_modules() if n and is_ignored(n, m, ignore)] + list(proxies) + list(keep)
        traced = model
        if keep_output:
            first = next(model.parameters())
            traced = KeepOutput(model, output_width(model, example)).to(first.device, first.dtype)
            ignored.append(traced.sentinel)
        pruner = meta_pruner(traced, sparsity, example, ignored, prune_heads, global_pruning, round_to)
        for group in pruner.step(interactive=True):
            group.prune()
    set_heads(model, pruner.num_heads)
    for _, layer in experts:
        layer.keep_neurons(expert_keep(layer, sparsity))
    for name, p in model.named_parameters():
        if name in trainable:
            p.requires_grad_(trainable[name])
