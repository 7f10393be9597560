"""Static int8 for convolutional backbones on CPU: PyTorch 2 Export quantisation (PT2E) with torchao's X86 Inductor
quantizer (``torch.export`` -> ``prepare_pt2e`` -> calibrate -> ``convert_pt2e`` -> ``torch.compile``), the scheme
``int8_pt2e`` of :mod:`zoo.quantize.schemes`.

torchao 0.18's ``quantize_`` has no int8 convolution; PT2E annotates the exported graph instead: per-channel symmetric
int8 weights, per-tensor affine uint8 activations (``HistogramObserver``), Conv + BatchNorm folded by ``prepare_pt2e``.
Inductor lowers the q/dq pattern to oneDNN int8 convolutions under ``torch.compile`` (eager runs the reference q/dq
graph: right numbers, not fast).

Checkpoints: a converted program keeps its activation scales as constants in the graph's code, so it cannot round-trip
through a state_dict. :class:`PT2EBackbone` keeps the *prepared* graph (Conv+BN folded, observers with their
calibrated statistics) as its state and rebuilds the converted graph from it (``convert_pt2e`` is deterministic). The
checkpoint holds the folded weights as int8 with their per-channel scales (:func:`_int8_weights`) plus the observers'
statistics; loading exports the float backbone again, prepares it, loads that state and converts: the same program.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

OBSERVER_PREFIX = "activation_post_process_"


def _quantizer(model: nn.Module, exclude: list[str] = (), qat: bool = False):
    """torchao's X86 Inductor quantizer (static, per-channel weights; its QAT config for ``qat``); modules matching
    ``exclude`` globs stay float."""
    import fnmatch

    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    for name, _ in model.named_modules():
        if name and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _weight_observers(prepared: nn.Module) -> dict[str, str]:
    """``{weight attribute: observer module}``: the observers that watch a parameter (per-channel weight observers)."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX) and node.args and getattr(node.args[0], "op", "") == "get_attr":
            out[node.args[0].target] = node.target
    return out


def pt2e_layers(model: nn.Module, scheme, exclude: list[str] = ()) -> list[str]:
    """The convolutions and Linears PT2E will quantise in ``model`` (none: fails, naming what the scheme handles)."""
    import fnmatch

    names = [n for n, m in model.named_modules() if n and type(m) in scheme.handles
             and not any(fnmatch.fnmatchcase(n, p) or n.startswith(p + ".") for p in exclude)]
    if not names:
        handles = "/".join(t.__name__ for t in scheme.handles)
        raise ValueError(f"scheme {scheme.name!r}: no {handles} layer in {type(model).__name__} (exclude={list(exclude)}); nothing to quantise")
    return names


class PT2EBackbone(nn.Module):
    """A backbone quantised by PT2E. Its state is the prepared graph (folded weights, observers); ``forward`` runs the
    converted int8 graph, built on first use after calibration or after a state_dict loads.

    Args:
        model: the float backbone (eval mode is used for export).
        example_shape: one sample's input shape (``[C, H, W]``); the batch dimension is exported dynamic.
        exclude: names of the float model's modules left in float.
        compile: ``torch.compile`` the converted graph (Inductor's int8 oneDNN kernels; the fast CPU path).
        qat: the graph is prepared for quantisation-aware training (:mod:`zoo.quantize.pt2e_qat`: exported in training
            mode, fake quantizers whose state comes from training); its weights are saved in float.
    """

    def __init__(self, model: nn.Module | None, example_shape: list[int], exclude: list[str] = (), compile: bool = False,
                 qat: bool = False, prepared: nn.Module | None = None):
        super().__init__()
        if prepared is None:
            example = torch.randn(2, *example_shape)
            if qat:
                from zoo.quantize.pt2e_qat import export_prepared

                prepared = export_prepared(model, example, exclude)
            else:
                from torch.export import Dim
                from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

                model.eval()
                exported = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=65536)},))
                prepared = prepare_pt2e(exported.module(), _quantizer(model, exclude))
        self.prepared, self.qat = prepared, qat
        self.example_shape, self.compile_converted = list(example_shape), compile
        self._converted: list[nn.Module] = []  # not a submodule: the state_dict is the prepared graph's
        self._weights = {} if qat else _weight_observers(self.prepared)
        self.register_state_dict_post_hook(_to_int8)
        self.register_load_state_dict_pre_hook(_from_int8)
        self.register_load_state_dict_post_hook(lambda module, keys: module._converted.clear())

    @classmethod
    def wrap(cls, prepared: nn.Module, example_shape: list[int], compile: bool = False, qat: bool = False) -> PT2EBackbone:
        """A backbone around a graph prepared already (QAT's, after training)."""
        return cls(None, example_shape, compile=compile, qat=qat, prepared=prepared)

    def train(self, mode: bool = True) -> PT2EBackbone:
        """Only this module's flag: the exported graphs run as exported, in eval mode (BatchNorm folded, no dropout);
        ``train()``/``eval()`` of an exported graph are refused by torchao, and Lightning calls them on every module."""
        self.training = mode
        return self

    @torch.no_grad()
    def observe(self, inputs: list[torch.Tensor]) -> None:
        """Calibrate: run the prepared graph (observers on) over ``inputs``; the next forward converts."""
        if not inputs:
            raise ValueError("PT2E calibration got 0 batches: a calibration set needs at least 1 batch")
        for x in inputs:
            self.prepared(x)
        self._converted.clear()

    def calibrated(self) -> bool:
        mins = [getattr(m, "activation_post_process", m).min_val for n, m in self.prepared.named_children()
                if n.startswith(OBSERVER_PREFIX) and n not in self._weights.values()]
        return bool(mins) and all(torch.isfinite(v).all() for v in mins)

    def converted(self) -> nn.Module:
        """The int8 graph (``convert_pt2e`` of a copy of the prepared one), compiled if asked."""
        if not self._converted:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

            if not self.calibrated():
                raise RuntimeError("PT2EBackbone: the observers have seen no data; calibrate (Quantize.observe) or load a "
                                   "quantised checkpoint first")
            graph = copy.deepcopy(self.prepared)
            if self.qat:
                from torchao.quantization.pt2e import move_exported_model_to_eval

                move_exported_model_to_eval(graph)  # BatchNorm on running statistics, no dropout; then folded
            graph = convert_pt2e(graph)
            if self.compile_converted:
                # Inductor's freezing (the PT2E X86 recipe) folds the int8 weights into prepacked oneDNN weights and
                # lowers q/dq + conv to int8 convolutions; without it the compiled graph runs float convolutions
                # between q/dq: compile_quantized runs every call with it (inference only, hence _run's no_grad)
                from zoo.quantize.compiled import compile_quantized

                graph = compile_quantized(graph)
            self._converted.append(graph)
        return self._converted[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the int8 graph's q/dq ops take float32 (under mixed precision too)
            return self._run(x.float())

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        graph = self.converted()
        if not self.compile_converted:
            return graph(x)
        with torch.no_grad():  # freezing compiles inference graphs only
            return graph(x)

    def float_model(self) -> nn.Module:
        """The float graph without observers (BatchNorm stays folded): the plain model :meth:`Quantize.undo` gives."""
        graph = copy.deepcopy(self.prepared)
        for node in list(graph.graph.nodes):
            if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX):
                node.replace_all_uses_with(node.args[0])
                graph.graph.erase_node(node)
                delattr(graph, node.target)
        graph.recompile()
        return graph

    def int8_bytes(self) -> int:
        """Bytes of the converted graph's tensors (int8 weights, scales): what the int8 model holds in memory."""
        graph = self.converted()
        graph = getattr(graph, "_orig_mod", graph)
        used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
        tensors = [_attr(graph, t) for t in used]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def int8_weights(self) -> list[torch.Tensor]:
        """The int8 constants of the converted graph (the quantised convolution / Linear weights)."""
        graph = self.converted()
        graph = getattr(graph, "_orig_mod", graph)
        used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
        return [t for t in (_attr(graph, n) for n in sorted(used)) if isinstance(t, torch.Tensor) and t.dtype == torch.int8]


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _qparams(observer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    scale, zero = observer.calculate_qparams()
    return scale, zero, observer.quant_min, observer.quant_max


def _to_int8(module: PT2EBackbone, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Saved weights as int8 with the observer's per-channel scales (the int8 values ``convert_pt2e`` makes)."""
    for weight, obs in module._weights.items():
        key = f"{prefix}prepared.{weight}"
        if key not in state_dict:
            continue
        observer = module.prepared.get_submodule(obs)
        if observer.min_val.numel() == 0:  # not calibrated yet: saved in float
            continue
        w = state_dict.pop(key)
        scale, zero, lo, hi = _qparams(observer)
        q = torch.ops.quantized_decomposed.quantize_per_channel(w.detach(), scale, zero, observer.ch_axis, lo, hi, torch.int8)
        state_dict[key + ":int8"] = q  # the op and qparams convert_pt2e folds into the graph: the same int8 values


def _from_int8(module: PT2EBackbone, state_dict: dict, prefix: str, *args: Any) -> None:
    """Float weights ``q * scale`` from the saved int8 ones and the (loaded) observers' scales; converting them again
    gives back exactly ``q``."""
    for weight, obs in module._weights.items():
        key = f"{prefix}prepared.{weight}"
        if key + ":int8" not in state_dict:
            continue
        q = state_dict.pop(key + ":int8").float()
        observer = copy.deepcopy(module.prepared.get_submodule(obs))
        ok = f"{prefix}prepared.{obs}."
        observer.load_state_dict({k[len(ok):]: v for k, v in state_dict.items() if k.startswith(ok)})
        scale, zero, _, _ = _qparams(observer)
        shape = [1] * q.ndim
        shape[observer.ch_axis] = -1
        state_dict[key] = (q - zero.reshape(shape)) * scale.reshape(shape)
