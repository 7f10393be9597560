"""Dynamic-rank DoRA (zoo.adapters.dynamic_rank) and AdaLoRA through peft, both driven by callbacks.rank_schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

import zoo
from callbacks.rank_schedule import RankSchedule, total_rank
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, tiny_base_checkpoint
from zoo.adapters.dynamic_rank import AdaLoRA, AdaLoraOrthogonality, ComponentVariance, DynamicRank, RankOneLinear, rank_one_layers
from zoo.losses import CrossEntropy


def _module(surgery, losses=None, lr=0.01, tiny=None):
    torch.manual_seed(0)
    module = zoo.Classifier(model=TINY_VIT, model_kwargs={**TINY_VIT_KWARGS, **(tiny or {})}, num_classes=10, surgery=[surgery], losses=losses,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
    module.configure_model()
    return module


def _fit(module, steps, schedule):
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[schedule], gradient_clip_val=1.0)
    trainer.fit(module, datamodule=Digits(samples_per_class=4, batch_size=8))
    return trainer


def test_layers_start_plain_and_merge_back():
    torch.manual_seed(0)
    plain = zoo.Classifier(model=TINY_VIT, model_kwargs=TINY_VIT_KWARGS, num_classes=10).backbone.eval()
    model = DynamicRank(rank=2).apply(copy.deepcopy(plain)).eval()
    layers = rank_one_layers(model)
    assert [n for n, _ in layers] == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(m.initial_rank == 3 and m.scaling == 8.0 / 3 for _, m in layers)  # ceil(1.5 * 2), alpha 8 / r0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n, _ in layers for p in ("lora_A", "lora_B", "lora_scaler")}
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), plain(x))  # scalars start at zero (official init)
    with torch.no_grad():
        for _, m in layers:
            m.lora_scaler.normal_()
            m.lora_scaler[0] = 0  # a pruned component
    adapted = model(x)
    assert (adapted - plain(x)).abs().max() > 1e-3
    merged = DynamicRank(rank=2).undo(model)
    assert not rank_one_layers(merged) and all(type(merged.get_submodule(n)) is nn.Linear for n, _ in layers)
    assert (merged(x) - adapted).abs().max() <= 1e-5


def test_importance_is_the_official_formula():
    layer = RankOneLinear(nn.Linear(6, 5), initial_rank=4, target_rank=2, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_scaler.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    # Finetune_Utils.py update_importance_score: einsum of the rank-one products, Frobenius norms
    a = layer.lora_A * layer.lora_scaler.unsqueeze(1)
    products = torch.einsum("ik,kj->kij", layer.lora_B, a)
    expected = products.norm(p="fro", dim=(1, 2)) / ((layer.lora_B @ a).norm(p="fro") + 1e-8)
    torch.testing.assert_close(layer.component_scores(1e-8), expected.detach())
    layer.update_importance(0.9)
    layer.update_importance(0.9)
    torch.testing.assert_close(layer.importance, (0.1 * 0.9 + 0.1) * expected.detach())
    # the regulariser: mean variance of a_i and b_i over 2 * r0 vectors per layer
    term = ComponentVariance()
    step = type("S", (), {"module": nn.Sequential(layer), "logits": torch.zeros(1)})()
    torch.testing.assert_close(term(step), (layer.lora_A.var(1).sum() + layer.lora_B.var(0).sum()) / 8)


def test_schedule_prunes_on_the_official_steps_and_counts():
    """Without training, pruned components stay pruned, so the zeroed count after step t is the official k(p)."""
    torch.manual_seed(0)
    layers = [RankOneLinear(nn.Linear(8, 8), initial_rank=3, target_rank=2, alpha=8, dropout=0.0) for _ in range(4)]
    for m in layers:
        with torch.no_grad():
            m.lora_scaler.uniform_(0.5, 1.5)
    schedule = RankSchedule(interval=2)
    schedule.layers, schedule.total = layers, 20  # what on_fit_start finds (total: the trainer's optimizer steps)
    got, expected, zeros = [], [], 0
    for t in range(1, 21):
        schedule.step_dynamic_rank(t)
        got.append(sum(int((m.lora_scaler == 0).sum()) for m in layers))
        p, last = int(t - 20 * 0.15), int(20 * (1 - 0.15 - 0.5))  # Finetune_Utils.py get_prune_step
        if 0 <= p <= last and (p % 2 == 0 or p == last):
            zeros = max(zeros, max(int(12 * ((3 - 2) / 3) * (p / last) ** 3), 1))  # prune_lora_scaler's kthvalue count
        expected.append(zeros)
        assert all(bool(m.mask_fixed) == (p >= last) for m in layers)
    assert got == expected == [0, 0, 1, 1, 1, 1, 1, 1, 2, 4] + [4] * 10
    assert sum(m.rank for m in layers) == 2 * 4


def test_dynamic_rank_moves_the_budget_to_the_official_total():
    # T = 20 steps, pruning steps p = int(t - 3) in [0, int(20 * 0.35) = 7], every 2 steps and at 7
    module = _module(DynamicRank(rank=2, dropout=0.0), losses=[CrossEntropy(), ComponentVariance(weight=0.1)])
    schedule = RankSchedule(interval=2)
    _fit(module, 20, schedule)
    layers = [m for _, m in rank_one_layers(module)]
    n = sum(m.initial_rank for m in layers)  # 8 matrices x 3 components
    official = n - int(n * (3 - 2) / 3)  # prune_rank_num at the final pruning step
    assert official == 2 * len(layers) == total_rank(module)
    ranks = [m.rank for m in layers]
    assert len(set(ranks)) > 1, ranks  # the budget moved: matrices end with different ranks
    assert all(bool(m.mask_fixed) for m in layers) and all((m.lora_scaler[m.final_mask] == 0).all() for m in layers)
    assert ComponentVariance()(type("S", (), {"module": module, "logits": torch.zeros(1)})()) == 0  # off after pruning
    assert schedule.prune_steps(20) == (17, 7)


def test_adalora_moves_the_budget_through_the_same_callback():
    module = _module(AdaLoRA(target_rank=2, initial_rank=3), losses=[CrossEntropy(), AdaLoraOrthogonality()])
    _fit(module, 20, RankSchedule(interval=2))
    assert type(module.backbone).__name__ == "VisionTransformer"  # peft swapped the layers in place
    config = module.surgery[0].tuner.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal, config.deltaT) == (20, 3, 10, 2)
    ranks = [int((p != 0).sum()) for n, p in module.named_parameters() if "lora_E" in n]
    assert len(ranks) == 8 and sum(ranks) == total_rank(module) == 2 * 8  # peft's target budget: target_r x matrices
    assert len(set(ranks)) > 1, ranks
    x = torch.randn(3, 1, 8, 8)
    module.eval()
    adapted = module(x)
    plain = module.unload_surgery()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert (module(x) - adapted).abs().max() <= 1e-5


def test_bad_inputs_fail_before_training():
    with pytest.raises(ValueError, match="budget rank=8 .* larger than initial_rank=4"):
        DynamicRank(rank=8, initial_rank=4)
    with pytest.raises(ValueError, match="cannot exceed the initial rank"):
        AdaLoRA(target_rank=13, initial_rank=12)
    with pytest.raises(ValueError, match="target 'qvk' matches no adaptable layer.*closest: .*qkv"):
        _module(DynamicRank(rank=2, targets=["qvk"]))
    with pytest.raises(ValueError, match="initial_rank=3 is larger than the smaller dimension of blocks.0.attn.qkv"):
        _module(DynamicRank(rank=2, targets=["qkv"]), tiny={"embed_dim": 2, "num_heads": 1})
    with pytest.raises(ValueError, match="start_ratio=0.6 and end_ratio=0.5"):
        RankSchedule(start_ratio=0.6, end_ratio=0.5)
    module = _module(DynamicRank(rank=2))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="total_steps=100 is beyond training \\(5 optimizer steps"):
        _fit(module, 5, RankSchedule(total_steps=100))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # nothing trained
    with pytest.raises(ValueError, match="no DynamicRank .* or AdaLoRA layer"):
        _fit(zoo.Classifier(model=TINY_VIT, model_kwargs=TINY_VIT_KWARGS, num_classes=10), 2, RankSchedule())


def test_trained_only_checkpoint_keeps_components_and_importance(tmp_path):
    from zoo.backbones import load_zoo_module

    data, kw = tiny_base_checkpoint(tmp_path / "base.ckpt")
    module = zoo.Classifier(model=str(tmp_path / "base.ckpt"), num_classes=4, surgery=[DynamicRank(rank=2)])
    trainer = Trainer(max_steps=4, callbacks=[RankSchedule(interval=1)], **kw)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "adapted.ckpt")
    saved = torch.load(tmp_path / "adapted.ckpt", weights_only=True)["state_dict"]
    assert "backbone.blocks.0.attn.qkv.base.weight" not in saved and "backbone.blocks.0.attn.qkv.importance" in saved
    reloaded = load_zoo_module(tmp_path / "adapted.ckpt").eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(reloaded(x), module.eval()(x))
    for (_, a), (_, b) in zip(rank_one_layers(reloaded), rank_one_layers(module)):
        assert torch.equal(a.importance, b.importance) and torch.equal(a.mask_fixed, b.mask_fixed)


def test_adalora_resumed_mid_schedule_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """peft's RankAllocator statistics (before the final mask) and rank pattern (after it) cross a checkpoint: resumed
    from step 2 (statistics) or step 6 (final pattern, masked every step) of 8, AdaLoRA ends bit-identical."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, checkpoints=False):
        module = _module(AdaLoRA(target_rank=2, initial_rank=3), losses=[CrossEntropy(), AdaLoraOrthogonality()])
        schedule = RankSchedule(interval=1)  # T = 8: tinit 1, tfinal 4, budgeting at steps 2-3, final mask at step 4
        callbacks = [schedule, *([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")] if checkpoints else [])]
        # max_epochs too: estimated_stepping_batches then reads the train loader (it must keep the checkpoint's loader state)
        Trainer(max_steps=8, max_epochs=2, logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, callbacks=callbacks, gradient_clip_val=1.0
                ).fit(module, datamodule=Digits(samples_per_class=4, batch_size=8), ckpt_path=ckpt_path)
        return {k: v.clone() for k, v in module.state_dict().items()}

    whole = run(checkpoints=True)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
    loops = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [s["batches"] for s in loops] == [2]  # mid-epoch (5 batches an epoch)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("RankSchedule"))["adalora"][0]
    assert len(state["exp_avg_ipt"]) == 3 * 8 and all(t.abs().sum() > 0 for t in state["exp_avg_unc"].values())  # A, E, B of 8 layers
    for step in (2, 6):
        resumed = run(ckpt_path=tmp_path / f"step={step}.ckpt")
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), step
    # the statistics matter: a resume that restarts them (as peft alone would) allocates the budget differently
    monkeypatch.setattr(RankSchedule, "_load_adalora", lambda self, states: None)
    forgetful = run(ckpt_path=tmp_path / "step=2.ckpt")
    assert any(not torch.equal(whole[k], forgetful[k]) for k in whole if "lora_E" in k)
