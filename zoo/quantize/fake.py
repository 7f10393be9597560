"""Fake quantisation for QAT with torchao's fake quantizers, attached to the model's own ``nn.Linear`` objects.

torchao's ``QATConfig(step="prepare")`` swaps each ``nn.Linear`` for a new ``FakeQuantizedLinear``. Here the same
object becomes one (its class is set to torchao's ``FakeQuantizedLinear`` and the quantizers are added as
children, which have no parameters or buffers): forward hooks (pruning masks, distillation taps), the optimizer's
parameter references, DDP's buckets and the state_dict keys all stay as they are, so checkpoints load with or
without QAT. :func:`detach` turns them back into plain ``nn.Linear``.

Weight quantizers are dynamic (scales from the current weights at each step) until :func:`freeze`, which keeps
each layer's current scale and zero point from then on (observer freezing, as ``torch.ao``'s
``disable_observer``); activation scales are per token, computed for each input (nothing to freeze). The configs
simulate the converted scheme exactly (:func:`zoo.quantize.schemes.fake_quant_configs`); with frozen scales the
conversion uses them too (:meth:`zoo.quantize.Quantize.use_weight_scales`), so the int8 model computes what QAT trained.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from zoo.quantize.schemes import Scheme, fake_quant_configs


def _fq_class():
    from torchao.quantization.qat import FakeQuantizedLinear

    return FakeQuantizedLinear


@functools.cache
def _per_token_class():
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    class SymmetricPerToken(IntxFakeQuantizer):
        """torchao's ``IntxFakeQuantizer`` with its missing branch, per-token *symmetric*, filled in with torchao's own
        primitives and the qparams ``Int8Tensor.from_hp`` computes for ``int8_dynamic``'s activations at run time
        (``choose_qparams_affine`` symmetric over each token's last dimension, int8 [-128, 127]); rounding is
        torchao's straight-through ``_Round``, so gradients flow as through its other fake quantizers."""

        def _per_token_forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.config.is_symmetric:
                return super()._per_token_forward(x)
            from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType, _fake_quantize_affine, choose_qparams_affine

            qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[self.config.dtype]
            block = (1,) * (x.ndim - 1) + (x.shape[-1],)
            full = x.float()  # under bf16 autocast too: bf16 cannot hold x / scale to the rounding step (0.5 above 64)
            self.scale, self.zero_point = choose_qparams_affine(full, MappingType.SYMMETRIC, block, self.config.dtype, qmin, qmax,
                                                                eps=self.config.eps, scale_dtype=self.config.scale_precision,
                                                                zero_point_dtype=torch.int8)
            return _fake_quantize_affine(full, block, self.scale, self.zero_point, quant_dtype=torch.int32, quant_min=qmin,
                                         quant_max=qmax).to(x.dtype)

    return SymmetricPerToken


def fake_quantizer(config) -> nn.Module:
    """torchao's fake quantizer for ``config`` (per-token symmetric: :class:`SymmetricPerToken`)."""
    from torchao.quantization.granularity import PerToken
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    if isinstance(getattr(config, "granularity", None), PerToken) and config.is_symmetric:
        return _per_token_class()(config)
    return FakeQuantizerBase.from_config(config)


def attach(model: nn.Module, names: list[str], scheme: Scheme) -> None:
    """Make each named ``nn.Linear`` of ``model`` a torchao ``FakeQuantizedLinear`` in place (disabled)."""
    cls = _fq_class()
    act, weight = fake_quant_configs(scheme)
    for name in names:
        m = model.get_submodule(name)
        if type(m) is cls:
            continue
        m.activation_fake_quantizer = fake_quantizer(act) if act is not None else None
        m.weight_fake_quantizer = fake_quantizer(weight)
        m.__class__ = cls
    set_enabled(model, False)


def fake_layers(model: nn.Module) -> dict[str, nn.Module]:
    cls = _fq_class()
    return {n: m for n, m in model.named_modules() if type(m) is cls}


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for m in fake_layers(model).values():
        for q in (m.activation_fake_quantizer, m.weight_fake_quantizer):
            if q is not None:
                q.enabled = enabled


def is_enabled(model: nn.Module) -> bool:
    return any(m.weight_fake_quantizer.enabled for m in fake_layers(model).values())


def _static(q: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    if q.config.is_dynamic:
        q.config = copy.copy(q.config)  # the config object is shared by all layers
        q.config.is_dynamic = False
    q.scale, q.zero_point = scale, zero_point


@torch.no_grad()
def freeze(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Fix each weight quantizer's scale and zero point to those of the current weights; returns them by layer."""
    from zoo.sharding import whole

    out = {}
    for name, m in fake_layers(model).items():  # the same order on every rank: whole() gathers a sharded weight
        q = m.weight_fake_quantizer
        if q.config.is_dynamic:
            enabled, q.enabled = q.enabled, True
            q(whole(m.weight))  # computes scale and zero point from the (whole) weights now
            q.enabled = enabled
            _static(q, q.scale.detach().clone(), q.zero_point.detach().clone())
        out[name] = {"scale": q.scale, "zero_point": q.zero_point}
    return out


def restore_frozen(model: nn.Module, frozen: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put back the scales :func:`freeze` returned (a resumed run)."""
    layers = fake_layers(model)
    for name, qp in frozen.items():
        q = layers[name].weight_fake_quantizer
        device = layers[name].weight.device
        _static(q, qp["scale"].to(device), qp["zero_point"].to(device))


def detach(model: nn.Module) -> list[str]:
    """Back to plain ``nn.Linear`` (same objects, same parameters); returns the layers' names."""
    names = []
    for name, m in fake_layers(model).items():
        del m.activation_fake_quantizer, m.weight_fake_quantizer
        m.__class__ = nn.Linear
        names.append(name)
    return names
