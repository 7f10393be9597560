"""Adapters (issue 19): target selection, LoRA/DoRA through peft (merge = unmerged output), FFN keys vs values,
trained-only checkpoints rebuilt by load_zoo_module, bad inputs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, fit_and_save
from zoo.adapters import KeysValues, LoRA, lora_layers, select
from zoo.backbones import build_backbone, load_zoo_module
from zoo.batch import Batch, collate
from zoo.classifier import Classifier

HF_KW = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}
VIT3 = {**TINY_VIT_KWARGS, "depth": 3}


def _text():
    return {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])}


def _case(family: str):
    """(backbone, input, LoRA targets) of one family, tiny."""
    torch.manual_seed(0)
    if family == "vit":
        return build_backbone(TINY_VIT, **VIT3), torch.randn(3, 1, 8, 8), {"parts": ["attention", "ffn"], "blocks": ["1..2"]}
    if family == "resnet":  # a CNN: conv layers by regex
        cnn = build_backbone("timm/resnet10t", in_chans=1)
        for m in cnn.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)  # timm zero-inits each block's last BN: its branch would add nothing
        return cnn, torch.randn(2, 1, 32, 32), {"targets": r"layer[34]\.0\.conv\d"}
    if family == "bert":
        return build_backbone("hf/bert", **HF_KW), _text(), {"targets": ["query", "value"], "parts": ["ffn"]}
    if family == "gpt2":  # HF Conv1D layers, weights stored (in, out)
        gpt2 = build_backbone("hf/gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
        return gpt2, _text(), {"parts": ["attention", "values"]}
    return build_backbone("hf/llama", num_key_value_heads=1, **HF_KW), _text(), {"parts": ["attention", "keys"], "blocks": [-1]}


def test_targets_by_parts_blocks_and_patterns():
    vit = build_backbone(TINY_VIT, **VIT3)
    assert select(vit, parts=["attention"], blocks=["1..2"]) == [f"blocks.{i}.attn.{n}" for i in (1, 2) for n in ("qkv", "proj")]
    assert select(vit, parts=["keys"], blocks=[0, -1]) == ["blocks.0.mlp.fc1", "blocks.2.mlp.fc1"]
    assert select(vit, targets=r"blocks\.\d\.mlp\.fc2") == select(vit, parts=["values"])
    assert select(vit, targets=["blocks.1.attn"]) == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]  # a container: its layers
    assert select(vit, targets=["qkv"], blocks=["blocks.2"]) == ["blocks.2.attn.qkv"]  # blocks restrict targets
    llama = build_backbone("hf/llama", num_key_value_heads=1, **HF_KW)
    assert select(llama, parts=["keys"], blocks=[1]) == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    assert select(llama, targets=["q_proj"], parts=["values"], blocks=[0]) == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]


def _lora_count(backbone, names, r, dora):
    """Trainable parameters LoRA adds, by hand: r * (in + out) per layer (+ out for DoRA's magnitude)."""
    from zoo.adapters.targets import layer_dims
    from zoo.families import root_of

    dims = [layer_dims(root_of(backbone).get_submodule(n)) for n in names]
    return sum(r * (i + o) + (o if dora else 0) for i, o in dims)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", ["vit", "resnet", "bert", "llama", "gpt2"])
def test_lora_merge_equals_unmerged_and_only_adapters_train(family, dora):
    backbone, x, where = _case(family)
    backbone.eval()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    y_base = backbone(x)
    surgery = LoRA(**where, r=4, alpha=8, dora=dora)
    names = surgery.layers(backbone)
    count = _lora_count(backbone, names, 4, dora)
    adapted = surgery.apply(backbone)
    assert adapted is backbone and len(lora_layers(backbone)) == len(names)
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == count
    with torch.no_grad():
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # B starts at zero: make the update visible
    y_adapted = backbone(x)
    assert (y_adapted - y_base).abs().max() > 1e-3
    plain = surgery.undo(backbone)
    assert not lora_layers(plain) and not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert set(dict(plain.named_parameters())) == set(before)
    assert all(p.requires_grad for p in plain.parameters())  # trainability as before
    assert (plain(x) - y_adapted).abs().max() <= 1e-5


def _classifier(**kw):
    torch.manual_seed(0)
    return Classifier(model=TINY_VIT, num_classes=4, model_kwargs=VIT3, **kw)


def _train(module, steps=2):
    module.configure_model()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()


@pytest.mark.parametrize("surgery,trained", [
    (LoRA(parts=["ffn"], blocks=[2], r=2, trainable=["norm"]), ["lora_A", "lora_B", "norm.weight", "norm.bias"]),
    (KeysValues(part="keys", blocks=["1..2"]), ["blocks.1.mlp.fc1.weight", "blocks.2.mlp.fc1.weight"]),
    (KeysValues(part="values", bias=True), [f"blocks.{i}.mlp.fc2.{w}" for i in range(3) for w in ("weight", "bias")]),
], ids=["lora", "keys", "values"])
def test_only_the_chosen_parameters_train_and_the_head(surgery, trained):
    module = _classifier(surgery=[surgery])
    module.configure_model()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    _train(module)
    changed = sorted(n for n, p in module.named_parameters() if not torch.equal(p, start[n]))
    assert "head.weight" in changed and "head.bias" in changed  # the head is outside the backbone surgery
    changed_backbone = [n[len("backbone."):] for n in changed if n.startswith("backbone.")]
    if isinstance(surgery, LoRA):
        assert all(any(t in n for t in trained) for n in changed_backbone) and "norm.weight" in changed_backbone
        assert {n.split(".lora_")[0] for n in changed_backbone if "lora_" in n} == {"blocks.2.mlp.fc1", "blocks.2.mlp.fc2"}
    else:
        assert changed_backbone == sorted(trained)
    module.unload_surgery()
    assert all(p.requires_grad for p in module.parameters())


def test_keys_values_on_llama_and_bert():
    llama = build_backbone("hf/llama", num_key_value_heads=1, **HF_KW)
    KeysValues(part="keys", blocks=[0]).apply(llama)
    assert sorted(n for n, p in llama.named_parameters() if p.requires_grad) == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    bert = build_backbone("hf/bert", **HF_KW)
    KeysValues(part="values", bias=True).apply(bert)
    assert sorted(n for n, p in bert.named_parameters() if p.requires_grad) == [
        f"model.encoder.layer.{i}.output.dense.{w}" for i in range(2) for w in ("bias", "weight")]


@pytest.mark.parametrize("surgery", [LoRA(parts=["attention", "ffn"], r=2, dora=True), KeysValues(part="values", blocks=[1])],
                         ids=["dora", "values"])
def test_checkpoint_holds_only_what_trained_and_reloads(tmp_path, surgery):
    base = _classifier()  # the "pretrained" base: a saved zoo module, rebuilt from its path
    fit_and_save(base, tmp_path / "base.ckpt", steps=1)
    module = Classifier(model=str(tmp_path / "base.ckpt"), num_classes=4, surgery=[surgery])
    fit_and_save(module, tmp_path / "adapted.ckpt")
    saved = torch.load(tmp_path / "adapted.ckpt", weights_only=True)["state_dict"]
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad and "lora_" not in n]
    assert frozen and not any(n in saved for n in frozen)
    assert all(n in saved for n, p in module.named_parameters() if p.requires_grad)
    assert (tmp_path / "adapted.ckpt").stat().st_size < 0.7 * (tmp_path / "base.ckpt").stat().st_size
    reloaded = load_zoo_module(tmp_path / "adapted.ckpt").eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(reloaded(x), module.eval()(x))
    Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0).fit(module, DataLoader([Batch(inputs=torch.randn(1, 8, 8), targets=torch.tensor(0))] * 8, batch_size=8,
                                                        collate_fn=collate), ckpt_path=tmp_path / "adapted.ckpt")  # resume: strict load


def test_checkpoint_of_an_unrebuildable_base_fails_loading(tmp_path):
    module = _classifier(surgery=[LoRA(parts=["ffn"], r=2)])  # random base, not seeded again at load
    module.configure_model()
    state = module.state_dict()
    torch.manual_seed(123)
    other = _classifier(surgery=[LoRA(parts=["ffn"], r=2)])
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1.0)  # a different base
    other.configure_model()
    with pytest.raises(RuntimeError, match="different base model"):
        other.load_state_dict(state)
    full = _classifier(surgery=[LoRA(parts=["ffn"], r=2, checkpoint="full")])
    full.configure_model()
    whole = full.state_dict()  # checkpoint: full keeps the base
    assert "backbone.blocks.0.mlp.fc1.base_layer.weight" in whole and not any("adapters_base" in k for k in whole)


@pytest.mark.parametrize("make,match", [
    (lambda: LoRA(targets=["qkvv"]).apply(build_backbone(TINY_VIT, **VIT3)), r"'qkvv' matches no adaptable layer.*closest: qkv"),
    (lambda: LoRA(targets=r"blocks\.\d\.mlp\.fc3").apply(build_backbone(TINY_VIT, **VIT3)), r"matches no adaptable layer; closest: blocks\.\d\.mlp\.fc"),
    (lambda: LoRA(parts=["ffn"], r=40).apply(build_backbone(TINY_VIT, **VIT3)), r"r=40 is larger than the smaller dimension .*blocks\.0\.mlp\.fc1 \(Linear 32->64\)"),
    (lambda: KeysValues(part="keys").apply(build_backbone("timm/resnet10t")), r"resnet model has no FFN the zoo knows"),
    (lambda: LoRA(parts=["values"]).apply(build_backbone("timm/resnet10t")), r"parts=\[values\] on a resnet model"),
    (lambda: LoRA(parts=["ffn"], blocks=[7]).apply(build_backbone(TINY_VIT, **VIT3)), r"block 7 is out of range: the model has 3 blocks"),
    (lambda: LoRA(), r"say where the adapters go"),
    (lambda: KeysValues(part="gate"), r"part='gate'"),
], ids=["name", "regex", "rank", "keys-resnet", "parts-resnet", "block", "nothing", "part"])
def test_bad_inputs_fail_with_the_bad_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_surgery_fails_before_training():
    module = _classifier(surgery=[LoRA(targets=["qkvv"])])
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="qkvv"):
        trainer.fit(module, DataLoader([Batch(inputs=torch.randn(1, 8, 8), targets=torch.tensor(0))] * 8, batch_size=8, collate_fn=collate))
    assert trainer.global_step == 0
