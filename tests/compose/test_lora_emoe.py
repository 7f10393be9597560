"""LoRA on an EMoE model's experts and gate (configs/compose/lora_emoe.yaml, zoo.adapters.emoe_lora.ExpertLoRA):
surgery Moefy then ExpertLoRA; every expert weight stack and the learned gate carry a peft adapter, only the adapters
and the head train, the experts' base weights stay bit-identical, and merging the adapters gives the same outputs."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import ParamWrapper

from tests.compose.test_lora_subtuning import Snapshot, tensors
from tests.helpers import ROOT, TINY_VIT, TINY_VIT_KWARGS
from tests.standin import fit_config
from zoo.adapters.emoe_lora import ExpertLoRA
from zoo.backbones import build_backbone
from zoo.emoe import EMoEFFN, Moefy, emoe_layers

CONFIG = ROOT / "configs" / "compose" / "lora_emoe.yaml"


def test_adapters_on_experts_and_gate_train_and_the_experts_stay_bit_identical(tmp_path, monkeypatch):
    run = fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.init_args.batch_size=16",
                     "--trainer.enable_checkpointing=false", "--trainer.callbacks+=tests.compose.test_lora_subtuning.Snapshot")
    module, trainer = run.model, run.trainer
    assert [type(s) for s in module.surgery] == [Moefy, ExpertLoRA] and trainer.global_step == 3
    ((name, layer),) = emoe_layers(module.backbone)  # stand-in depth 2: the official ViT choice is block 0 (L - 4 .. cut)
    assert name.startswith("blocks.0.mlp") and layer.num_experts == 24 and layer.router_kind == "linear"
    wrappers = [m for m in module.backbone.modules() if isinstance(m, ParamWrapper)]
    assert sorted(w.parameter_name for w in wrappers) == ["fc1_weight", "fc2_weight", "router"]
    assert all(w.num_experts == (1 if w.parameter_name == "router" else 24) for w in wrappers)  # one pair per expert
    (snap,) = [c for c in trainer.callbacks if isinstance(c, Snapshot)]
    adapters = {n for n in snap.tensors if ".lora_" in n}
    assert len(adapters) == 6 and snap.trainable == adapters | {"head.weight", "head.bias"}
    after = tensors(module)
    changed = {n for n, t in after.items() if not torch.equal(t, snap.tensors[n])}
    assert changed == snap.trainable  # adapters and head trained, nothing else moved
    experts = [n for n in snap.tensors if n.endswith(("fc1_weight", "fc2_weight", "fc1_bias", "fc2_bias", ".router"))]
    assert len(experts) == 5 and all(torch.equal(after[n], snap.tensors[n]) for n in experts)  # base experts and gate: same bits
    # undo merges the adapters into the stacked experts and the gate: a plain EMoE layer, same outputs
    module.eval()
    x = next(iter(run.datamodule.val_dataloader())).inputs
    with torch.no_grad():
        adapted = module(x)
        module.surgery[1].undo(module.backbone)
        merged = module(x)
    plain = module.backbone.get_submodule("blocks.0.mlp")
    assert isinstance(plain, EMoEFFN) and not any(isinstance(m, ParamWrapper) for m in module.backbone.modules())
    assert (merged - adapted).abs().max() <= 1e-5
    fc1 = next(t for n, t in snap.tensors.items() if n.endswith("fc1_weight"))
    assert not torch.equal(plain.fc1_weight, fc1)  # the trained update is in the merged weights


def tiny_emoe(**moefy) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(TINY_VIT, **TINY_VIT_KWARGS)
    return Moefy(**{"num_experts": 4, "top_k": 2, "layers": [1], "gate_noise": 0.0, "cluster_inits": 1, **moefy}).apply(model)


@pytest.mark.parametrize("make, surgery, message", [
    (lambda: build_backbone(TINY_VIT, **TINY_VIT_KWARGS), ExpertLoRA(), "put zoo.emoe.Moefy before ExpertLoRA"),
    (lambda: tiny_emoe(gate="learned", router="cosine"), ExpertLoRA(r=2), "cosine router"),
    (lambda: tiny_emoe(), ExpertLoRA(r=20), "r=20 is larger than the smaller dimension"),  # experts of 16 neurons
    (lambda: tiny_emoe(), ExpertLoRA(blocks=[0]), "no EMoE layer lies in blocks"),
], ids=["no-experts", "cosine-gate", "rank", "blocks"])
def test_bad_inputs_fail_before_training(make, surgery, message):
    with pytest.raises(ValueError, match=message):
        surgery.apply(make())


def test_checkpoint_holds_only_the_adapters_and_reloads(tmp_path):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from zoo.backbones import load_zoo_module
    from zoo.batch import Batch, collate
    from zoo.classifier import Classifier

    data = DataLoader([Batch(inputs=torch.randn(1, 8, 8), targets=torch.tensor(i % 4)) for i in range(16)], batch_size=8, collate_fn=collate)

    def fit(module, path):
        trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu", devices=1, limit_val_batches=0)
        trainer.fit(module, data)
        trainer.save_checkpoint(path)

    torch.manual_seed(0)
    fit(Classifier(TINY_VIT, num_classes=4, model_kwargs=TINY_VIT_KWARGS), tmp_path / "base.ckpt")  # the "pretrained" base
    moefy = Moefy(num_experts=4, top_k=2, layers=[1], gate="learned", router="linear", cluster_inits=1)
    module = Classifier(str(tmp_path / "base.ckpt"), num_classes=4, surgery=[moefy, ExpertLoRA(r=2, alpha=4)])
    fit(module, tmp_path / "adapted.ckpt")
    saved = torch.load(tmp_path / "adapted.ckpt", weights_only=True)["state_dict"]
    assert not any(k.endswith(("fc1_weight", "fc2_weight", ".router", "qkv.weight")) for k in saved)  # the frozen base is not saved
    assert {n for n, p in module.named_parameters() if p.requires_grad} <= set(saved)
    reloaded = load_zoo_module(tmp_path / "adapted.ckpt").eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(reloaded(x), module.eval()(x))
