"""LoRA with distillation (configs/compose/lora_kd.yaml): a LoRA student learns from labels and a frozen
full-precision teacher's soft targets. Only the adapters and the head train; the teacher stays outside the
optimizer and unchanged; the KD term alone reaches the adapters."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback

from tests.compose.test_lora_subtuning import tensors
from tests.helpers import ROOT
from tests.standin import fit_config
from zoo.adapters import LoRA, lora_layers
from zoo.distillation import SoftTargetKL, pool_of
from zoo.losses import Step

CONFIG = ROOT / "configs" / "compose" / "lora_kd.yaml"


class Snapshot(Callback):
    """Student and teacher tensors, and the student's trainable names, when training starts."""

    def on_train_start(self, trainer, module):
        self.student = tensors(module)
        self.trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        (self.teacher,) = [tensors(t.model) for t in pool_of(module).teachers.values()]


def test_lora_student_distils_and_only_adapters_and_head_train(tmp_path, monkeypatch):
    run = fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.init_args.batch_size=16",
                     "--trainer.enable_checkpointing=false", "--trainer.callbacks+=tests.compose.test_lora_kd.Snapshot")
    module, trainer = run.model, run.trainer
    assert [type(s) for s in module.surgery] == [LoRA] and trainer.global_step == 3
    assert {"train/soft_target_kl", "train/cross_entropy"} <= set(trainer.logged_metrics)
    assert set(lora_layers(module.backbone)) == {f"blocks.{b}.{layer}" for b in (0, 1) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    (snap,) = [c for c in trainer.callbacks if isinstance(c, Snapshot)]
    adapters = {n for n in snap.student if ".lora_" in n}
    assert len(adapters) == 16 and snap.trainable == adapters | {"head.weight", "head.bias"}
    after = tensors(module)
    assert {n for n, t in after.items() if not torch.equal(t, snap.student[n])} == snap.trainable  # nothing else moved
    # the teacher: frozen, in no optimizer group, bit-identical after training
    (teacher,) = [t.model for t in pool_of(module).teachers.values()]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(p.requires_grad or id(p) in optimized for p in teacher.parameters())
    assert optimized == {id(p) for n, p in module.named_parameters() if n in snap.trainable}
    assert all(torch.equal(t, snap.teacher[n]) for n, t in tensors(teacher).items())
    # the distillation term alone sends gradient into the adapters
    batch = next(iter(run.datamodule.train_dataloader()))
    module.train()
    kd = module.loss_term(SoftTargetKL)(Step(module, batch, module(batch.inputs)))
    lora_b = [p for n, p in module.named_parameters() if ".lora_B." in n]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(kd, lora_b))
