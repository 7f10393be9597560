"""Which layers a scheme quantises (checked before any work), and BatchNorm folding."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from zoo.quantize.schemes import Scheme, schemes_for

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def weighted(module: nn.Module) -> bool:
    """A layer with a matrix (or kernel) of weights of its own: the things a scheme may quantise."""
    w = module._parameters.get("weight", module._parameters.get("weight_orig"))
    return w is not None and w.ndim >= 2


def _linear_like(module: nn.Module) -> bool:
    """A layer that does a Linear's job but is not one (HF GPT-2's ``Conv1D``): a scheme would silently skip it."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _cannot(name: str, module: nn.Module, scheme: Scheme) -> ValueError:
    can = schemes_for(module)
    handles = "/".join(t.__name__ for t in scheme.handles)
    others = (f"schemes that handle {type(module).__name__}: {', '.join(can)}" if can else
              f"no zoo scheme handles {type(module).__name__}; leave it in float (add it to `exclude`)")
    return ValueError(f"layer {name!r} is a {type(module).__module__}.{type(module).__name__}: scheme {scheme.name!r} "
                      f"quantises {handles} layers only ({others})")


def select_layers(model: nn.Module, scheme: Scheme, layers: list[str] | None = None, exclude: list[str] = ()) -> list[str]:
    """Names of the layers ``scheme`` quantises in ``model``: every ``nn.Linear`` (``layers=None``), or the weighted
    layers matching the ``layers`` globs, minus ``exclude``. A chosen layer of a type the scheme cannot handle
    (or, by default, a Linear-like layer it would skip) fails naming the layer and the schemes that can."""
    chosen = []
    for name, module in model.named_modules():
        if not name or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if layers is None:
            if _linear_like(module):
                raise _cannot(name, module, scheme)
            if type(module) is nn.Linear:
                chosen.append(name)
        elif weighted(module) and any(fnmatch.fnmatchcase(name, p) for p in layers):
            if type(module) not in scheme.handles:
                raise _cannot(name, module, scheme)
            chosen.append(name)
    if not chosen:
        what = "no nn.Linear layer" if layers is None else f"no weighted layer matches layers={layers}"
        raise ValueError(f"scheme {scheme.name!r}: {what} in {type(model).__name__} (exclude={list(exclude)}); nothing to quantise")
    return chosen


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BATCHNORMS) for m in model.modules())


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(conv, bn)`` pairs where a BatchNorm is the next child after a convolution of the same width in one parent
    (``nn.Sequential(conv, bn, ...)``, timm's ``conv_pw``/``bn1``). A heuristic: registration order is data order
    in these models; an FX trace would be exact but fails on data-dependent control flow."""
    pairs = []
    for parent in model.modules():
        children = list(parent.children())
        for a, b in zip(children, children[1:]):
            if isinstance(a, CONVS) and isinstance(b, BATCHNORMS) and b.num_features == a.out_channels and b.track_running_stats:
                pairs.append((a, b))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm's running statistics and affine into the preceding convolution (eval-mode numerics),
    and make the BatchNorm an identity (kept, so state_dict keys and ``BatchNormAct``'s activation stay). Returns
    the number of folded pairs."""
    pairs = conv_bn_pairs(model)
    for conv, bn in pairs:
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight if bn.affine else None, bn.bias if bn.affine else None)
        conv.weight = nn.Parameter(w.detach(), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b.detach(), requires_grad=conv.weight.requires_grad)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) == 1: the BatchNorm passes its input through
        if bn.affine:
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        bn.eval()
    return len(pairs)
