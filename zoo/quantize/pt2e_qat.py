"""Quantisation-aware training of convolutional backbones for ``int8_pt2e``: torchao's PT2E QAT flow (``torch.export`` in
training mode -> ``prepare_qat_pt2e`` with the X86 Inductor quantizer's QAT config -> train -> ``convert_pt2e``), driven
by :class:`callbacks.quantize.QuantizationAwareTraining` on its schedule.

``prepare_qat_pt2e`` keeps the backbone's own parameters and buffers (same objects, same names: the optimizer, DDP's
buckets and the float state_dict keys stay valid) and adds fake-quantize modules (``activation_post_process_<i>``:
``FusedMovingAvgObsFakeQuantize``, observer + fake quant) on every annotated op's input, weights (per channel) and
outputs; each Conv + BatchNorm pair becomes torchao's QAT pattern (the convolution sees BN-scaled, fake-quantised weights,
BatchNorm still trains), folded by ``convert_pt2e``. BatchNorm freezing sets the graph's ``batch_norm`` ops to use their
running statistics (the PT2E QAT tutorial's recipe).

Checkpoints while training (:func:`prepare`): the backbone's state_dict holds only the float keys (the fake quantizers'
state is the callback's), so ``last.ckpt`` is a float model any process loads; a resumed run exports and prepares the
restored float backbone again (deterministic) and loads the quantizers' state back: the same graph, the same state. The
converted model (:func:`finish`) is a :class:`~zoo.quantize.pt2e.PT2EBackbone` with ``qat=True``: its state is the QAT
graph with the quantizers, and reloading prepares the float backbone the same way and converts.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.quantize.pt2e import OBSERVER_PREFIX as PREFIX  # the fake-quantize modules prepare_qat_pt2e adds


def export_prepared(model: nn.Module, example: torch.Tensor, exclude: list[str] = ()) -> torch.fx.GraphModule:
    """``model`` exported in training mode (batch dimension dynamic) and prepared for QAT; ``train()``/``eval()`` of the
    result switch its dropout and BatchNorm ops (torchao's ``allow_exported_model_train_eval``)."""
    from torch.export import Dim
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from zoo.quantize.pt2e import _quantizer

    model.train()
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=65536)},))
    graph = prepare_qat_pt2e(exported.module(), _quantizer(model, exclude, qat=True))
    return allow_exported_model_train_eval(graph)


def _drop_quantizers(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k[len(prefix):].startswith(PREFIX)]:
        del state_dict[key]


DEVICES = ("cpu", "cuda")


def _float32_in(module, args):
    module._zoo_autocast = [(d, torch.is_autocast_enabled(d)) for d in DEVICES]
    for d in DEVICES:
        torch.set_autocast_enabled(d, False)
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _autocast_back(module, args, out):
    for d, on in getattr(module, "_zoo_autocast", ()):
        torch.set_autocast_enabled(d, on)


def prepare(model: nn.Module, example: torch.Tensor, exclude: list[str] = ()) -> torch.fx.GraphModule:
    """The training graph: :func:`export_prepared` whose state_dict leaves out the fake quantizers (:func:`quantizer_state`
    carries them), with fake quantisation and observers off until :func:`set_window` turns them on. It runs in float32
    under mixed precision (autocast off inside it): torchao's fused fake-quantize op takes float32 only, and the int8
    model it simulates computes from float32 ranges."""
    graph = export_prepared(model, example, exclude)
    graph.register_forward_pre_hook(_float32_in)
    graph.register_forward_hook(_autocast_back, always_call=True)
    graph._zoo_hook = graph.register_state_dict_post_hook(_drop_quantizers)
    set_window(graph, fake_quant=False, observe=False)
    return graph


def quantizers(graph: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in graph.named_children() if n.startswith(PREFIX)}


def quantizer_state(graph: nn.Module) -> dict[str, torch.Tensor]:
    """The fake quantizers' buffers (scales, zero points, observed ranges, on/off flags), by ``<quantizer>.<buffer>``."""
    return {f"{n}.{k}": v.detach().clone() for n, m in quantizers(graph).items() for k, v in m.state_dict().items()}


def load_quantizer_state(graph: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from collections import OrderedDict

    for n, m in quantizers(graph).items():
        values = OrderedDict((k[len(n) + 1:], v) for k, v in state.items() if k.startswith(n + "."))
        values._metadata = m.state_dict()._metadata  # the modules' versions: without them the observers reset their eps
        m.load_state_dict(values)


def observed(graph: nn.Module) -> bool:
    """Whether every quantizer has seen data (finite observed ranges)."""
    return all(bool(torch.isfinite(m.activation_post_process.min_val).all()) for m in quantizers(graph).values())


def broadcast_quantizers(graph: nn.Module) -> None:
    """Rank 0's quantizer buffers to every rank (as DDP's ``broadcast_buffers`` does for a module's own buffers, which it
    registered before these quantizers existed): every rank fake-quantises with the same ranges."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for m in quantizers(graph).values():
            for buffer in m.buffers():
                dist.broadcast(buffer, src=0)


def set_window(graph: nn.Module, fake_quant: bool, observe: bool) -> None:
    """Fake quantisation on/off, and observers (range statistics) on/off, in every quantizer."""
    for m in quantizers(graph).values():
        m.enable_fake_quant(fake_quant)
        m.enable_observer(observe)


def sync_mode(graph: torch.fx.GraphModule, training: bool) -> None:
    """Put the graph's dropout and BatchNorm ops in ``training`` mode. Lightning ends validation by setting each module's
    ``training`` flag back without calling ``train()``, which would leave an exported graph running BatchNorm in eval."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    (move_exported_model_to_train if training else move_exported_model_to_eval)(graph)  # no-ops when already there


def freeze_batchnorm(graph: torch.fx.GraphModule) -> int:
    """Every ``batch_norm`` op of the graph uses (and no longer updates) its running statistics; returns how many.
    Again after each ``train()``: torchao's mode switch rewrites the BatchNorm ops."""
    count, changed = 0, False
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default):
            if node.args[5]:
                args = list(node.args)
                args[5] = False  # training
                node.args = tuple(args)
                changed = True
            count += 1
    if changed:  # called every step from bn_freeze_step on: regenerate the code only when an op changed
        graph.recompile()
    return count


def finish(graph: torch.fx.GraphModule, example_shape: list[int], compile: bool = False) -> nn.Module:
    """The QAT graph as an int8 :class:`~zoo.quantize.pt2e.PT2EBackbone` (converted on first use; its state_dict keeps the
    quantizers, so a saved int8 module reloads)."""
    from zoo.quantize.pt2e import PT2EBackbone

    graph._zoo_hook.remove()
    del graph._zoo_hook
    set_window(graph, fake_quant=True, observe=False)
    return PT2EBackbone.wrap(graph, example_shape, compile=compile, qat=True)
