"""Distillation into an SN-Net (configs/compose/kd_into_snnet.yaml): the KD term is zoo.distillation's SoftTargetKL,
logged by name, with the largest anchor as it was before training (or a zoo checkpoint) as its teacher, and its
gradient alone reaches the stitching layers of the sampled stitch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from datamodules import FashionMNIST
from tests.helpers import ROOT
from tests.standin import fit_config, write_all
from zoo.backbones import load_zoo_module
from zoo.classifier import Classifier
from zoo.distillation import SoftTargetKL, pool_of
from zoo.losses import Step

CONFIG = ROOT / "configs" / "compose" / "kd_into_snnet.yaml"


class KeepLargest(Callback):
    """The largest anchor's weights when training starts."""

    def on_train_start(self, trainer, module):
        self.state = copy.deepcopy(module.net.anchors[-1].state_dict())


def run_config(tmp_path: Path, monkeypatch, *extra: str):
    """``zoo fit`` of the compose config on stand-in data for 3 steps; returns the CLI."""
    return fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--callbacks.sweep.init_args.latency_repeats=1",
                      "--trainer.callbacks+=tests.compose.test_kd_into_snnet.KeepLargest", *extra)


def kd_gradients(module, term, batch, stitch: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """Gradients of the KD term alone (on ``stitch``'s logits) with respect to ``params``."""
    module.train()
    kd = term(Step(module, batch, module.net(batch.inputs, stitch)))
    return list(torch.autograd.grad(kd, params, allow_unused=True))


def test_kd_term_is_logged_and_its_gradient_reaches_the_stitching_layers(tmp_path, monkeypatch):
    run = run_config(tmp_path, monkeypatch)
    module, trainer = run.model, run.trainer
    term = module.loss_term(SoftTargetKL)
    assert type(term) is SoftTargetKL and term.teacher == "largest"  # the zoo's one KD implementation
    assert {"train/soft_target_kl", "train/cross_entropy", "train/loss_epoch"} <= set(trainer.logged_metrics)
    # the teacher: the largest anchor as training found it, frozen, outside the module (its parameters and checkpoint)
    (keep,) = [c for c in trainer.callbacks if isinstance(c, KeepLargest)]
    teacher = pool_of(module).teachers["largest"].model
    assert all(torch.equal(v, keep.state[k]) for k, v in teacher.backbone.state_dict().items())
    before = teacher.backbone.blocks[0].mlp.fc1.weight.clone()
    with torch.no_grad():
        module.net.anchors[-1].blocks[0].mlp.fc1.weight.add_(1.0)  # a copy: the anchor trains on, the teacher does not follow
    assert torch.equal(teacher.backbone.blocks[0].mlp.fc1.weight, before)
    assert not any(p.requires_grad for p in teacher.parameters()) and not any(k.startswith("teacher") for k in module.state_dict())
    # the KD term alone sends gradient into the stitching layer of a stitch, and none into it from an anchor alone
    batch = next(iter(run.datamodule.train_dataloader()))
    stitch = next(s for s in module.net.stitches if s.kind == "sl")
    layer = module.net.layer(stitch.route[0], stitch.route[1], stitch.layers[0])
    grads = kd_gradients(module, term, batch, stitch.id, [layer.weight, layer.bias])
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert kd_gradients(module, term, batch, module.net.anchor_ids[0], [layer.weight]) == [None]


def test_teacher_from_a_zoo_checkpoint(tmp_path, monkeypatch):
    seed_everything(0)
    data = write_all(tmp_path / "teacher_data")
    teacher = Classifier("zoo/mlp", model_kwargs={"in_chans": 1, "img_size": 28, "hidden": (32,)})
    fit = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=tmp_path)
    fit.fit(teacher, FashionMNIST(data_dir=str(data), batch_size=16))
    ckpt = str(tmp_path / "teacher.ckpt")
    fit.save_checkpoint(ckpt)
    losses = [{"class_path": "zoo.losses.CrossEntropy", "init_args": {"weight": 0.5}},
              {"class_path": "zoo.distillation.SoftTargetKL", "init_args": {"weight": 0.5, "temperature": 2.0, "teacher": ckpt}}]
    run = run_config(tmp_path, monkeypatch, f"--model.init_args.losses={json.dumps(losses)}")
    module = run.model
    term = module.loss_term(SoftTargetKL)
    assert term.teacher == ckpt and "train/soft_target_kl" in run.trainer.logged_metrics
    assert list(pool_of(module).teachers) == [ckpt] and "largest" not in pool_of(module).teachers
    # the KD value of a step is the formula with the checkpoint's logits, and reaches the stitching layer
    batch = next(iter(run.datamodule.train_dataloader()))
    stitch = next(s for s in module.net.stitches if s.kind == "sl")
    logits = module.net(batch.inputs, stitch.id)
    with torch.no_grad():
        t_logits = load_zoo_module(ckpt).eval()(batch.inputs)
    p_t = torch.softmax(t_logits.double() / 2, -1)
    by_hand = (p_t * (p_t.log() - torch.log_softmax(logits.double() / 2, -1))).sum(-1).mean() * 4
    kd = term(Step(module, batch, logits))
    torch.testing.assert_close(kd, by_hand)
    layer = module.net.layer(stitch.route[0], stitch.route[1], stitch.layers[0])
    assert torch.autograd.grad(kd, layer.weight)[0].abs().sum() > 0
