"""The quantisation schemes: which torchao config each one is, which layer types it handles, what it calibrates.

=====================  ============================================  ===================  ======================
scheme                 torchao 0.18 config                           layer types          calibration
=====================  ============================================  ===================  ======================
``int8_weight_only``   ``Int8WeightOnlyConfig``                      Linear, Embedding    none (per-row weight
                                                                                          min-max)
``int8_dynamic``       ``Int8DynamicActivationInt8WeightConfig``     Linear               none: per-token
                                                                                          activation scales at
                                                                                          run time
``int8_static``        ``Int8StaticActivationInt8WeightConfig``      Linear               one activation scale
                       (per-tensor activations, per-row weights)                          per layer, from the
                                                                                          calibration set
``int8_pt2e``           none: PT2E (``torch.export``, ``prepare_pt2e``  Conv1d/2d/3d, Linear  activation statistics
                       / ``convert_pt2e``, X86 Inductor quantizer;                        (histograms) of every
                       :mod:`zoo.quantize.pt2e`)                                          quantised op's input
=====================  ============================================  ===================  ======================

``int8_pt2e`` quantises the whole exported backbone (every convolution and Linear the X86 quantizer annotates, BatchNorm
folded), not single layers: ``layers`` must be left unset, ``exclude`` leaves modules in float. The calibration set of the dynamic and weight-only schemes measures the quantisation error (float logits vs int8
logits, logged) and nothing else. For QAT, :func:`fake_quant_configs` gives torchao's ``IntxFakeQuantizeConfig``
pair that simulates a scheme exactly as its converted model computes (torchao ``Int8Tensor.from_hp``: symmetric, int8
range [-128, 127], scale = absmax / 127.5, float32 eps): per-row weights, and for ``int8_dynamic`` per-token
activations, which torchao 0.18's ``IntxFakeQuantizer`` leaves unimplemented when symmetric
(:class:`zoo.quantize.fake.SymmetricPerToken` fills that one branch with torchao's own primitives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Scheme:
    name: str
    handles: tuple[type, ...]
    static: bool  # needs one calibrated activation scale per layer
    qat: bool  # has a fake-quant simulation
    config: Callable[..., Any]  # (act_scale or None) -> torchao config
    pt2e: bool = False  # whole-graph PT2E quantisation (torch.export) rather than torchao quantize_ on layers


def _weight_only(scale=None):
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _dynamic(scale=None):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _static(scale=None):
    from torchao.quantization import Int8StaticActivationInt8WeightConfig
    from torchao.quantization.granularity import PerRow, PerTensor

    return Int8StaticActivationInt8WeightConfig(act_quant_scale=scale.float(), granularity=[PerTensor(), PerRow()])


SCHEMES: dict[str, Scheme] = {
    "int8_weight_only": Scheme("int8_weight_only", (nn.Linear, nn.Embedding), static=False, qat=True, config=_weight_only),
    "int8_dynamic": Scheme("int8_dynamic", (nn.Linear,), static=False, qat=True, config=_dynamic),
    "int8_static": Scheme("int8_static", (nn.Linear,), static=True, qat=False, config=_static),
}

# Whole-graph schemes (PT2E, :mod:`zoo.quantize.pt2e`): they quantise the exported backbone, not layers one by one, so
# they are kept apart from SCHEMES (whose per-layer checks and messages they do not follow).
PT2E_SCHEMES: dict[str, Scheme] = {
    "int8_pt2e": Scheme("int8_pt2e", (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), static=False, qat=True, config=lambda scale=None: None,
                        pt2e=True),
}


def get_scheme(name: str, qat: bool = False) -> Scheme:
    """The scheme called ``name``; an unknown name (or one without QAT, for ``qat``) fails listing the valid ones."""
    every = {**SCHEMES, **PT2E_SCHEMES}
    valid = [n for n, s in every.items() if s.qat or not qat]
    if name not in valid:
        raise ValueError(f"scheme={name!r}: expected one of {', '.join(valid)}" + (" (the schemes with quantisation-aware training)" if qat else ""))
    return every[name]


def schemes_for(layer: nn.Module) -> list[str]:
    """The per-layer schemes that handle ``layer``'s type (exact type: HF's ``Conv1D`` is not a Linear). Convolutions are
    quantised by the whole-graph ``int8_pt2e`` (:data:`PT2E_SCHEMES`)."""
    return [n for n, s in SCHEMES.items() if type(layer) in s.handles]


def fake_quant_configs(scheme: Scheme):
    """torchao ``(activation, weight)`` fake-quantize configs simulating ``scheme`` as converted: int8 per-row symmetric
    weights, and for ``int8_dynamic`` int8 per-token symmetric activations (``Int8DynamicActivationInt8WeightConfig``'s
    default ``act_mapping_type``), with the float32 eps ``Int8Tensor.from_hp`` uses (it matters for all-zero rows)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    eps = torch.finfo(torch.float32).eps
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True, eps=eps)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=True, eps=eps) if scheme.name == "int8_dynamic" else None
    return act, weight
