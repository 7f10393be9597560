"""An EMoE student distilled from its dense teacher (configs/compose/emoe_student_kd.yaml): the student is the
teacher's backbone made into experts (zoo.emoe.Moefy), the teacher stays dense and untouched, the KD term is logged,
and its gradient alone reaches the experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

import cli
from datamodules import FashionMNIST
from tests.helpers import ROOT
from tests.standin import point_data_dirs, write_all
from zoo.backbones import load_zoo_module
from zoo.classifier import Classifier
from zoo.distillation import SoftTargetKL, pool_of
from zoo.emoe import EMoEFFN, Moefy, emoe_layers
from zoo.losses import Step

CONFIG = ROOT / "configs" / "compose" / "emoe_student_kd.yaml"
DENSE = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 48, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


class KeepStart(Callback):
    """The student's backbone when training starts (after the surgery)."""

    def on_train_start(self, trainer, module):
        self.state = {k: v.clone() for k, v in module.backbone.state_dict().items()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[str, Path]:
    """A dense ViT classifier trained a few steps on the stand-in Fashion-MNIST, saved as a zoo checkpoint."""
    tmp = tmp_path_factory.mktemp("dense")
    data = write_all(tmp / "data")
    seed_everything(0)
    model = Classifier("timm/vit_tiny_patch16_224", model_kwargs=DENSE)
    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(model, FashionMNIST(data_dir=str(data), batch_size=16))
    trainer.save_checkpoint(tmp / "dense.ckpt")
    return str(tmp / "dense.ckpt"), data


def test_emoe_student_learns_from_its_dense_teacher(dense, tmp_path, monkeypatch):
    ckpt, data = dense
    conf = yaml.safe_load(CONFIG.read_text())
    conf["data"] = point_data_dirs(conf["data"], str(data))
    model = conf["model"]["init_args"]
    assert model["model"] == model["losses"][1]["init_args"]["teacher"]  # the config's student is its teacher's backbone
    model["model"] = model["losses"][1]["init_args"]["teacher"] = ckpt
    (tmp_path / CONFIG.name).write_text(yaml.safe_dump(conf))
    monkeypatch.chdir(tmp_path)
    run = cli.main(["fit", "--config", str(tmp_path / CONFIG.name), "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=16",
                    "--trainer.callbacks+=tests.compose.test_emoe_student_kd.KeepStart"])
    module, trainer = run.model, run.trainer
    assert isinstance(module.surgery[0], Moefy)
    layers = emoe_layers(module.backbone)
    assert [n for n, _ in layers] == ["blocks.0.mlp"]  # the official ViT choice ([L-4, L-2], cut to the blocks) for 2 blocks
    assert {"train/soft_target_kl", "train/cross_entropy"} <= set(trainer.logged_metrics)
    # the teacher: the dense checkpoint, no experts, untouched by training
    teacher = pool_of(module).teachers[ckpt].model
    reference = load_zoo_module(ckpt)
    assert not emoe_layers(teacher.backbone) and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in teacher.state_dict().items())
    # the student started as the teacher's backbone (outside the FFN that became experts)
    (keep,) = [c for c in trainer.callbacks if isinstance(c, KeepStart)]
    dense_state = reference.backbone.state_dict()
    shared = [k for k in keep.state if k in dense_state and not k.startswith("blocks.0.mlp")]
    assert shared and all(torch.equal(keep.state[k], dense_state[k]) for k in shared)
    # the KD term alone reaches the experts
    batch = next(iter(run.datamodule.train_dataloader()))
    module.train()
    kd = module.loss_term(SoftTargetKL)(Step(module, batch, module(batch.inputs)))
    (_, experts), = layers
    assert isinstance(experts, EMoEFFN)
    grads = torch.autograd.grad(kd, [experts.fc1_weight, experts.fc2_weight])
    assert all(g.abs().sum() > 0 for g in grads)
    losses = json.loads(json.dumps(module.hparams.losses))  # plain data in the hyperparameters: the run can be rebuilt
    assert losses[1]["init_args"]["teacher"] == ckpt
