"""zoo.quantize: int8 schemes within a stated tolerance of float, the quantised model reloads, layers a scheme cannot
handle fail naming the schemes that can, BatchNorm folding keeps the function, QAT fake quantizers and freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import build_backbone
from zoo.batch import Batch
from zoo.classifier import Classifier
from zoo.quantize import MinMax, Quantize, SCHEMES, fold_batchnorm, get_scheme, quantize_module, relative_error, select_layers
from zoo.quantize import fake

# int8 logits of a tiny random-weight model stay within this relative error of float (measured 0.005-0.009 for
# weight-only, dynamic and static on the tiny ViT; 1/127 is one int8 step)
TOLERANCE = 0.03


def tiny_vit(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS).eval()


def batches(n: int = 2, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(inputs=torch.randn(8, 1, 8, 8, generator=g), targets=torch.zeros(8, dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_int8_vit_logits_within_tolerance_of_float(scheme):
    module = tiny_vit()
    x = batches(1, seed=1)[0].inputs
    with torch.no_grad():
        reference = module(x)
    report = quantize_module(module, Quantize(scheme), batches())
    with torch.no_grad():
        out = module(x)
    from torchao.quantization import Int8Tensor

    linears = [m for m in module.backbone.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)  # every Linear really is int8
    error = relative_error(reference, out)
    assert 0 < error < TOLERANCE and report.logit_rel_error < TOLERANCE
    assert report.layers == 4 * TINY_VIT_KWARGS["depth"] and report.int8_bytes < report.float_bytes
    assert module.hparams["surgery"][-1]["init_args"]["scheme"] == scheme


def test_static_scales_are_minmax_of_the_calibration_inputs():
    module = tiny_vit()
    seen = {}
    hook = module.backbone.blocks[0].mlp.fc1.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0].abs().amax()))
    scales = MinMax().calibrate(lambda b: module(b.inputs), module.backbone, ["blocks.0.mlp.fc1"], batches(3))
    hook.remove()
    assert torch.allclose(scales["blocks.0.mlp.fc1"].flatten(), torch.stack(seen["x"]).max() / 127)
    assert scales["blocks.0.mlp.fc1"].shape == (1, 1, 1)  # the rank of the layer's (tokens) input


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_static"])
def test_saved_quantised_module_reloads_with_the_same_outputs(scheme, tmp_path):
    from lightning.pytorch import Trainer

    from zoo import load_zoo_module

    module = tiny_vit()
    quantize_module(module, Quantize(scheme), batches())
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "q.ckpt", weights_only=True)
    loaded = load_zoo_module(tmp_path / "q.ckpt").eval()
    x = batches(1, seed=2)[0].inputs
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))  # same int8 data, weight and (static) activation scales
    if scheme == "int8_static":
        scale = loaded.backbone.blocks[1].mlp.fc2.weight.act_quant_scale
        assert scale.item() != 1.0 and torch.equal(scale, module.backbone.blocks[1].mlp.fc2.weight.act_quant_scale)  # not the placeholder


@pytest.mark.parametrize("name,kwargs", [
    ("hf/bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64)),  # MiniLM-like
    ("hf/llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=64)),
])
def test_text_encoders_quantise_within_tolerance(name, kwargs):
    torch.manual_seed(0)
    backbone = build_backbone(name, **kwargs).eval()
    inputs = {"input_ids": torch.randint(0, 64, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        reference = backbone(inputs)
        q = Quantize("int8_dynamic").apply(copy.deepcopy(backbone))
        out = q(inputs)
    per_layer = 7 if name == "hf/llama" else 6  # q k v o + (gate) up down  /  q k v attn-out, intermediate, output
    assert len(Quantize("int8_dynamic").select(backbone)) == 2 * per_layer
    assert 0 < relative_error(reference, out) < TOLERANCE


def test_compiled_int8_runs_every_linear_on_onednn_qlinear_with_the_eager_outputs():
    """``compile: true`` on CPU: Inductor freezing with torchao's X86 passes turns every int8 Linear (``_int_mm``) into
    oneDNN ``qlinear_pointwise`` (the fast path, zoo.quantize.compiled); the outputs stay those of the eager int8 model."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    backbone = build_backbone("hf/bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64).eval()
    inputs = {"input_ids": torch.randint(0, 64, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):  # (a cache hit skips the passes: no count)
        eager = Quantize("int8_dynamic").apply(copy.deepcopy(backbone))(inputs)
        compiled = Quantize("int8_dynamic", compile=True).apply(copy.deepcopy(backbone))
        out = compiled(inputs)
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 12  # 2 layers x (q k v attn-out intermediate output)
    assert relative_error(eager, out) < 1e-4  # the same integers; float rounding of the scaling order differs


def test_layer_the_scheme_cannot_handle_names_it_and_the_schemes_that_can():
    backbone = tiny_vit().backbone
    with pytest.raises(ValueError, match=r"'patch_embed.proj' is a torch.nn.modules.conv.Conv2d.*no zoo scheme handles Conv2d"):
        Quantize("int8_dynamic", layers=["*"]).select(backbone)
    assert len(Quantize("int8_dynamic", layers=["*"], exclude=["patch_embed.*"]).select(backbone)) == 8
    text = build_backbone("hf/bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    with pytest.raises(ValueError, match=r"'model.embeddings.word_embeddings' .*Embedding: scheme 'int8_dynamic' quantises Linear "
                                         r"layers only \(schemes that handle Embedding: int8_weight_only\)"):
        Quantize("int8_dynamic", layers=["model.embeddings.*"]).select(text)
    assert Quantize("int8_weight_only", layers=["model.embeddings.*"]).select(text)[0] == "model.embeddings.word_embeddings"
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed Linear, which torchao would silently skip

    gpt2_like = nn.Sequential(nn.Linear(4, 4), Conv1D(4, 4))
    with pytest.raises(ValueError, match=r"'1' is a transformers.pytorch_utils.Conv1D.*no zoo scheme handles Conv1D"):
        select_layers(gpt2_like, get_scheme("int8_weight_only"))
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        select_layers(nn.Sequential(nn.Conv2d(1, 2, 3)), get_scheme("int8_dynamic"))
    with pytest.raises(ValueError, match="scheme='int4'.*int8_weight_only, int8_dynamic, int8_static"):
        Quantize("int4")


def test_batchnorm_folding_keeps_the_function():
    torch.manual_seed(0)
    net = build_backbone("zoo/convnet", widths=(4, 8))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 1, 12, 12)
    reference = net(x)
    assert fold_batchnorm(net) == 2
    assert torch.allclose(net(x), reference, atol=1e-5)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_fake_quant_is_torchaos_int8_and_freezing_keeps_the_scales():
    module = tiny_vit()
    backbone = module.backbone
    fc1 = backbone.blocks[0].mlp.fc1
    weight, x = fc1.weight, torch.randn(3, 5, fc1.in_features)
    plain = fc1(x)
    fake.attach(backbone, ["blocks.0.mlp.fc1"], get_scheme("int8_dynamic"))
    assert fc1.weight is weight and set(backbone.state_dict()) == set(tiny_vit().backbone.state_dict())  # same object, keys
    assert torch.equal(fc1(x), plain)  # attached disabled
    fake.set_enabled(backbone, True)
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    eps = torch.finfo(torch.float32).eps
    w_fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True, eps=eps))
    a_fq = fake.fake_quantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=True, eps=eps))
    assert torch.equal(fc1(x), nn.functional.linear(a_fq(x), w_fq(weight), fc1.bias)) and not torch.equal(fc1(x), plain)
    plain_copy = copy.deepcopy(backbone)
    fake.detach(plain_copy)
    int8 = Quantize("int8_dynamic", layers=["blocks.0.mlp.fc1"]).apply(plain_copy).blocks[0].mlp.fc1
    assert torch.equal(w_fq(weight), int8.weight.dequantize())  # the converted layer's int8 weights, bit for bit
    with torch.no_grad():
        assert relative_error(fc1(x), int8(x)) < 1e-6  # and its symmetric per-token activations (summation order aside)
    frozen = fake.freeze(backbone)
    with torch.no_grad():
        weight.mul_(1.5)  # the weights move on; the frozen scale does not
    assert torch.equal(fc1.weight_fake_quantizer.scale, frozen["blocks.0.mlp.fc1"]["scale"])
    fc1(x)
    assert torch.equal(fc1.weight_fake_quantizer.scale, frozen["blocks.0.mlp.fc1"]["scale"])
    assert fake.detach(backbone) == ["blocks.0.mlp.fc1"] and type(fc1) is nn.Linear
