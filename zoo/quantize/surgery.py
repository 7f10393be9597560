"""``Quantize``: the int8 model as a surgery, so a saved quantised module reloads with ``zoo.load_zoo_module``.

A quantised checkpoint stores ``Quantize(...)`` in the module's ``surgery`` hyperparameters: loading rebuilds the
float backbone, applies the same transform (torchao's ``quantize_`` on the same layers, placeholder activation
scales) and then loads the int8 tensors (torchao's ``Int8Tensor``: int8 data, scales, and for ``int8_static`` the
calibrated activation scale) over them; checkpoints hold them as plain tensors (:mod:`zoo.quantize.serial`).
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.quantize.layers import fold_batchnorm, select_layers
from zoo.quantize.schemes import get_scheme
from zoo.quantize.serial import plain_state
from zoo.surgery import Surgery


class Quantize(Surgery):
    """Quantise the backbone's layers with torchao (see :mod:`zoo.quantize.schemes`).

    Args:
        scheme: ``int8_weight_only``, ``int8_dynamic`` or ``int8_static``.
        layers: globs of layer names (``blocks.*.mlp.*``); default every ``nn.Linear``.
        exclude: globs of layer names left in float.
        fold_bn: fold BatchNorm into the preceding convolution first (:func:`~zoo.quantize.layers.fold_batchnorm`).
        act_ranks: ``int8_static``: the rank of each layer's input (torchao's static scale has that many dimensions);
            set by calibration, stored so that a reloaded model rebuilds the same scales.
        compile: ``torch.compile`` the quantised model in place (``nn.Module.compile``, keys unchanged). On CPU
            torchao's int8 kernels are fast only compiled (eager int8 dynamic-activation is slower than float).
    """

    def __init__(self, scheme: str = "int8_dynamic", layers: list[str] | None = None, exclude: list[str] = (),
                 fold_bn: bool = False, act_ranks: dict[str, int] | None = None, compile: bool = False):
        self.scheme = scheme
        self.layers = None if layers is None else list(layers)
        self.exclude = list(exclude)
        self.fold_bn = fold_bn
        self.act_ranks = None if act_ranks is None else dict(act_ranks)
        self.compile = compile
        self._scheme = get_scheme(scheme)
        self.act_scales: dict[str, torch.Tensor] = {}  # int8_static: calibrated scales (a state_dict carries them)
        self.quantized: list[str] = []
        self._hooks: list = []

    def calibrated(self, scales: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
        """Activation scales from a calibrator (``int8_static``) and the rank of each layer's input."""
        self.act_scales, self.act_ranks = dict(scales), dict(ranks)

    def select(self, model: nn.Module) -> list[str]:
        """The layers this transform quantises in ``model`` (fails on a layer the scheme cannot handle)."""
        return select_layers(model, self._scheme, self.layers, self.exclude)

    def transform(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_

        names = self.select(model)
        if self.fold_bn:
            fold_batchnorm(model)
        if self._scheme.static:
            for name in names:
                rank = (self.act_ranks or {}).get(name, 2)
                scale = self.act_scales.get(name, torch.ones(())).reshape((1,) * rank)  # a placeholder until a state_dict loads
                quantize_(model, self._scheme.config(scale), filter_fn=lambda m, fqn, n=name: fqn == n)
        else:
            chosen = set(names)
            quantize_(model, self._scheme.config(), filter_fn=lambda m, fqn: fqn in chosen)
        self.quantized = names
        self._hooks = [h for name in names for h in plain_state(model.get_submodule(name))]
        if self.compile:
            model.compile()
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        """Dequantised float weights (the int8 rounding stays; BatchNorm stays folded): a plain model."""
        for name in self.quantized:
            module = model.get_submodule(name)
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
        for h in self._hooks:
            h.remove()
        self.quantized, self._hooks = [], []
        return model
