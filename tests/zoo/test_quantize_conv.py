"""int8 for convolutional backbones (scheme ``int8_pt2e``: torch.export + torchao PT2E with the X86 Inductor quantizer):
logits within a stated tolerance of float, every convolution really int8 in the converted graph, a saved module
reloads with equal outputs, BatchNorm folded, bad inputs (zero calibration batches, layer globs, uncalibrated use)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from zoo.batch import Batch
from zoo.classifier import Classifier
from zoo.quantize import Quantize, relative_error
from zoo.quantize.pt2e import PT2EBackbone

# int8 (per-channel weights, per-tensor uint8 activations) logits of timm's random-weight test_efficientnet stay within
# this relative error of float (measured 0.0018 on three held-out batches; one int8 step is 1/127 = 0.008)
TOLERANCE = 0.02


def tiny_efficientnet(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    module = Classifier("timm/test_efficientnet", num_classes=10, model_kwargs={"in_chans": 1})
    module.configure_model()
    return module.eval()


def batches(n: int = 3, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(inputs=torch.randn(8, 1, 32, 32, generator=g), targets=torch.zeros(8, dtype=torch.long)) for _ in range(n)]


@torch.no_grad()
def quantize_pt2e(module: Classifier, data: list[Batch]) -> Quantize:
    """What ``zoo.quantize.ptq.quantize_module`` does for ``int8_pt2e``: record the float backbone's inputs, transform,
    calibrate, record the transform in the module's surgery."""
    quantizer = Quantize("int8_pt2e")
    with quantizer.recording(module.backbone) as inputs:
        for b in data:
            module(b.inputs)
    module.backbone = quantizer.apply(module.backbone)
    quantizer.observe(module.backbone, inputs)
    module.surgery.append(quantizer)
    module.hparams["surgery"] = [t.config() for t in module.surgery]
    return quantizer


@pytest.fixture(scope="module")
def quantized():
    module = tiny_efficientnet()
    float_module = tiny_efficientnet()
    quantizer = quantize_pt2e(module, batches())
    return module, float_module, quantizer


def test_int8_convolutions_within_tolerance_of_float(quantized):
    module, float_module, quantizer = quantized
    x = batches(1, seed=1)[0].inputs
    with torch.no_grad():
        error = relative_error(float_module(x), module(x))
    assert 0 < error < TOLERANCE
    convs = [n for n, m in float_module.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(quantizer.quantized) == sorted(convs) and quantizer.example_shape == [1, 32, 32]
    graph = module.backbone.converted()
    ops = collections.Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
    assert ops["aten.conv2d.default"] == len(convs) and "aten.batch_norm" not in " ".join(ops)  # BatchNorm folded
    # every convolution's weight is an int8 constant dequantised per channel; its input is quantised per tensor
    for node in graph.graph.nodes:
        if node.target is torch.ops.aten.conv2d.default:
            weight, act = node.args[1], node.args[0]
            assert weight.target is torch.ops.quantized_decomposed.dequantize_per_channel.default
            assert getattr(graph, weight.args[0].target).dtype == torch.int8
            assert act.target is torch.ops.quantized_decomposed.dequantize_per_tensor.default
    assert len(module.backbone.int8_weights()) == len(convs)


def test_saved_int8_module_reloads_with_equal_outputs(quantized, tmp_path):
    from lightning.pytorch import Trainer

    from zoo import load_zoo_module

    module, _, _ = quantized
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "q.ckpt", weights_only=True)
    state = torch.load(tmp_path / "q.ckpt", weights_only=True)["state_dict"]
    assert sum(v.dtype == torch.int8 for v in state.values()) == len(module.backbone.int8_weights())  # int8 on disk
    loaded = load_zoo_module(tmp_path / "q.ckpt").eval()
    assert isinstance(loaded.backbone, PT2EBackbone)
    x = batches(1, seed=2)[0].inputs
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))  # same int8 weights, the same calibrated activation scales
        fresh = Classifier("timm/test_efficientnet", num_classes=10, model_kwargs={"in_chans": 1},
                           surgery=[{"class_path": "zoo.quantize.Quantize", "init_args": {"scheme": "int8_pt2e", "example_shape": [1, 32, 32]}}])
        fresh.configure_model()
        with pytest.raises(RuntimeError, match="observers have seen no data"):  # never a silently uncalibrated int8 model
            fresh.eval()(x)


def test_undo_gives_the_float_function_with_batchnorm_folded(quantized):
    module, float_module, quantizer = quantized
    x = batches(1, seed=3)[0].inputs
    graph = module.backbone.float_model()
    with torch.no_grad():
        assert relative_error(float_module.backbone(x), graph(x)) < 1e-4
    assert not any(n.startswith("activation_post_process") for n, _ in graph.named_children())


def test_bad_inputs_fail_with_a_message():
    module = tiny_efficientnet()
    quantizer = Quantize("int8_pt2e")
    with pytest.raises(ValueError, match="0 batches"):
        with quantizer.recording(module.backbone):
            pass  # a calibration set of zero batches
    with pytest.raises(ValueError, match="needs example_shape"):
        quantizer.apply(module.backbone)
    with pytest.raises(ValueError, match="leave layers unset"):
        Quantize("int8_pt2e", layers=["blocks.*"])
    with pytest.raises(ValueError, match=r"no Conv1d/Conv2d/Conv3d/Linear layer in Sequential"):
        Quantize("int8_pt2e").select(nn.Sequential(nn.ReLU()))


def test_compiled_int8_runs_every_convolution_on_onednn_int8():
    """``compile: true``: the converted graph runs through :func:`zoo.quantize.compile_quantized` (Inductor freezing
    with torchao's X86 passes), which lowers every q/dq + convolution to oneDNN's int8 convolution; the outputs stay
    within the tolerance of the uncompiled int8 graph (requantisation rounding differs)."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    data = [b.inputs for b in batches(2)]
    x = batches(1, seed=1)[0].inputs
    outs = {}
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):  # (a cache hit skips the passes: no count)
        for compiled in (False, True):
            backbone = Quantize("int8_pt2e", compile=compiled, example_shape=[1, 32, 32]).apply(copy.deepcopy(net))
            backbone.observe(data)
            outs[compiled] = backbone(x)
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 2  # both convolutions
    assert relative_error(outs[False], outs[True]) < TOLERANCE
