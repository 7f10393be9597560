"""``Quantize``: the int8 model as a surgery, so a saved quantised module reloads with ``zoo.load_zoo_module``.

A quantised checkpoint stores ``Quantize(...)`` in the module's ``surgery`` hyperparameters: loading rebuilds the
float backbone, applies the same transform (torchao's ``quantize_`` on the same layers, placeholder activation
scales) and then loads the int8 tensors (torchao's ``Int8Tensor``: int8 data, scales, and for ``int8_static`` the
calibrated activation scale) over them; checkpoints hold them as plain tensors (:mod:`zoo.quantize.serial`).

``int8_pt2e`` (convolutional backbones) replaces the backbone by a :class:`~zoo.quantize.pt2e.PT2EBackbone` (the
exported, prepared graph): calibrate it with :meth:`Quantize.observe` (or load a checkpoint's state into it), and its
forward runs the converted int8 graph. ``example_shape`` (one sample's input shape, recorded by ``observe``) is stored
in the hyperparameters so that loading exports the same graph.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from zoo.quantize.compiled import compile_quantized
from zoo.quantize.layers import fold_batchnorm, select_layers
from zoo.quantize.pt2e import PT2EBackbone, pt2e_layers
from zoo.quantize.schemes import get_scheme
from zoo.quantize.serial import plain_state
from zoo.surgery import Surgery


class Quantize(Surgery):
    """Quantise the backbone's layers with torchao (see :mod:`zoo.quantize.schemes`).

    Args:
        scheme: ``int8_weight_only``, ``int8_dynamic``, ``int8_static`` (Linears, torchao ``quantize_``) or ``int8_pt2e``
            (convolutional backbones: the whole exported graph, :mod:`zoo.quantize.pt2e`).
        layers: globs of layer names (``blocks.*.mlp.*``); default every ``nn.Linear``.
        exclude: globs of layer names left in float.
        fold_bn: fold BatchNorm into the preceding convolution first (:func:`~zoo.quantize.layers.fold_batchnorm`).
        act_ranks: ``int8_static``: the rank of each layer's input (torchao's static scale has that many dimensions);
            set by calibration, stored so that a reloaded model rebuilds the same scales.
        compile: ``torch.compile`` the quantised model in place (keys unchanged; on CPU with Inductor freezing and
            oneDNN int8 GEMMs: :func:`~zoo.quantize.compiled.compile_quantized`). On CPU torchao's int8 kernels are
            fast only compiled (eager int8 dynamic-activation is slower than float).
        example_shape: ``int8_pt2e``: one sample's input shape the backbone is exported with; recorded by
            :meth:`recording` from the calibration inputs, stored so that a reloaded model exports the same graph.
        qat: ``int8_pt2e``: the model was quantisation-aware trained (:mod:`zoo.quantize.pt2e_qat`); reloading prepares
            the float backbone for QAT, loads the trained quantizers' state and converts.
    """

    def __init__(self, scheme: str = "int8_dynamic", layers: list[str] | None = None, exclude: list[str] = (),
                 fold_bn: bool = False, act_ranks: dict[str, int] | None = None, compile: bool = False,
                 example_shape: list[int] | None = None, qat: bool = False):
        self.scheme = scheme
        self.layers = None if layers is None else list(layers)
        self.exclude = list(exclude)
        self.fold_bn = fold_bn
        self.act_ranks = None if act_ranks is None else dict(act_ranks)
        self.compile = compile
        self.example_shape = None if example_shape is None else list(example_shape)
        self.qat = qat
        self._scheme = get_scheme(scheme)
        if self._scheme.pt2e and layers is not None:
            raise ValueError(f"scheme 'int8_pt2e' quantises the whole exported backbone: leave layers unset (got layers={layers}); "
                             "use `exclude` to keep modules in float")
        self.act_scales: dict[str, torch.Tensor] = {}  # int8_static: calibrated scales (a state_dict carries them)
        self.weight_scales: dict[str, torch.Tensor] = {}  # QAT's frozen per-row weight scales (a state_dict carries them)
        self.quantized: list[str] = []
        self._hooks: list = []

    def calibrated(self, scales: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
        """Activation scales from a calibrator (``int8_static``) and the rank of each layer's input."""
        self.act_scales, self.act_ranks = dict(scales), dict(ranks)

    def use_weight_scales(self, scales: dict[str, torch.Tensor]) -> None:
        """Quantise these layers' weights with the given per-row scales (QAT's frozen ones, :func:`zoo.quantize.fake.freeze`)
        instead of their current absmax, so the int8 model rounds and clamps each weight as the fake quantizer did."""
        self.weight_scales = {name: s.detach().reshape(-1, 1).float() for name, s in scales.items()}

    @contextmanager
    def recording(self, model: nn.Module):
        """``int8_pt2e``: collect ``model``'s (the float backbone's) inputs while the block runs, as calibration inputs
        for :meth:`observe`, and record their sample shape. Other schemes: an empty list, nothing recorded."""
        inputs: list[torch.Tensor] = []
        if not self._scheme.pt2e:
            yield inputs
            return
        hook = model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
        try:
            yield inputs
        finally:
            hook.remove()
        self.record_shape(inputs)

    def record_shape(self, inputs: list[torch.Tensor]) -> None:
        """``int8_pt2e``: the sample shape the backbone is exported with (from calibration inputs)."""
        if not inputs:
            raise ValueError("calibration got 0 batches: a calibration set needs at least 1 batch")
        self.example_shape = list(inputs[0].shape[1:])

    @staticmethod
    def observe(model: nn.Module, inputs: list[torch.Tensor]) -> None:
        """``int8_pt2e``: calibrate the transformed backbone's observers on ``inputs`` (backbone inputs)."""
        if not isinstance(model, PT2EBackbone):
            raise TypeError(f"observe() calibrates an int8_pt2e backbone (PT2EBackbone), got {type(model).__name__}")
        model.observe(inputs)

    def select(self, model: nn.Module) -> list[str]:
        """The layers this transform quantises in ``model`` (fails on a layer the scheme cannot handle)."""
        if self._scheme.pt2e:
            return pt2e_layers(model, self._scheme, self.exclude)
        return select_layers(model, self._scheme, self.layers, self.exclude)

    def transform(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_

        names = self.select(model)
        if self._scheme.pt2e:
            if self.example_shape is None:
                raise ValueError("Quantize('int8_pt2e') needs example_shape (one sample's input shape, e.g. [3, 224, 224]) to export "
                                 "the backbone; Quantize.recording records it from the calibration inputs")
            self.quantized = names
            return PT2EBackbone(model, self.example_shape, self.exclude, compile=self.compile, qat=self.qat)
        if self.fold_bn:
            fold_batchnorm(model)
        if self._scheme.static:
            for name in names:
                rank = (self.act_ranks or {}).get(name, 2)
                scale = self.act_scales.get(name, torch.ones(())).reshape((1,) * rank)  # a placeholder until a state_dict loads
                quantize_(model, self._scheme.config(scale), filter_fn=lambda m, fqn, n=name: fqn == n)
        else:
            chosen = set(names)
            floats = {n: model.get_submodule(n).weight.detach().clone() for n in self.weight_scales if n in chosen}
            quantize_(model, self._scheme.config(), filter_fn=lambda m, fqn: fqn in chosen)
            for name, weight in floats.items():
                _requantize(model.get_submodule(name), weight, self.weight_scales[name])
        self.quantized = names
        self._hooks = [h for name in names for h in plain_state(model.get_submodule(name))]
        if self.compile:
            compile_quantized(model)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        """Dequantised float weights (the int8 rounding stays; BatchNorm stays folded): a plain model."""
        if isinstance(model, PT2EBackbone):
            self.quantized = []
            return model.float_model()
        for name in self.quantized:
            module = model.get_submodule(name)
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
        for h in self._hooks:
            h.remove()
        self.quantized, self._hooks = [], []
        return model


def _requantize(layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """``layer``'s torchao ``Int8Tensor`` weight made again from the float ``weight`` with a given per-row ``scale``
    (same activation quantisation, same kernels)."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    old = layer.weight
    new = Int8Tensor.from_hp(weight, PerRow(), scale=scale.to(weight.device), act_quant_kwargs=old.act_quant_kwargs,
                             act_quant_scale=old.act_quant_scale, reduce_range=old.reduce_range)
    layer.weight = nn.Parameter(new, requires_grad=False)
