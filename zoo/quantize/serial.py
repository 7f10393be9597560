"""Quantised weights in checkpoints as plain tensors.

A torchao int8 weight is a tensor subclass (``Int8Tensor``: int8 ``qdata``, ``scale``, for ``int8_static`` the
activation scale). Pickled as is, it cannot be read by Lightning's ``trainer.test(ckpt_path=...)`` (its identity
``map_location`` function is refused for tensor subclasses) nor with ``weights_only`` in general. So a quantised
layer's state_dict holds the inner tensors under ``<key>:<name>`` (``blocks.0.mlp.fc1.weight:qdata``), and loading
rebuilds the subclass with the metadata of the layer it loads into (the same scheme, applied by ``Quantize``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_quantized(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "__tensor_flatten__") and hasattr(t, "tensor_data_names")


def _flatten(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, p in module.named_parameters(recurse=False):
        key = prefix + name
        if is_quantized(p) and key in state_dict:
            value = state_dict.pop(key)
            for inner in value.__tensor_flatten__()[0]:
                state_dict[f"{key}:{inner}"] = getattr(value, inner)


def _unflatten(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for name, p in module.named_parameters(recurse=False):
        key = prefix + name
        inner = {k.split(":", 1)[1]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(key + ":")]}
        if inner and is_quantized(p):
            attrs = p.__tensor_flatten__()[1]
            state_dict[key] = type(p).__tensor_unflatten__(inner, attrs, p.size(), p.stride())


def plain_state(module: nn.Module) -> list:
    """Make ``module``'s quantised parameters save and load as plain tensors; returns the hook handles."""
    return [module.register_state_dict_post_hook(_flatten), module.register_load_state_dict_pre_hook(_unflatten)]
