"""Pruning an EMoE model (configs/compose/prune_emoe.yaml): the default selection reaches the experts, the by-type
report lists EMoEFFN, a selection that leaves every FFN unpruned is reported, StructuredPruning narrows the experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from callbacks.pruning import MagnitudePruning, StructuredPruning, by_module_type
from callbacks.pruning_schedules import Linear
from datamodules import Digits
from tests.helpers import ROOT, TINY_VIT, TINY_VIT_KWARGS
from tests.standin import fit_config
from zoo.classifier import Classifier
from zoo.emoe import EMoEFFN, Moefy, emoe_layers

CONFIG = ROOT / "configs" / "compose" / "prune_emoe.yaml"
EXPERTS = ("fc1_weight", "fc2_weight")


def run_config(tmp_path: Path, monkeypatch, *extra: str):
    """``zoo fit`` of the compose config on stand-in data, 3 steps, pruned to 50 % at steps 0..2; returns the CLI."""
    schedule = "--callbacks.pruning.init_args.schedule.init_args"
    return fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.init_args.batch_size=16",
                      f"{schedule}.start=0", f"{schedule}.end=2", f"{schedule}.frequency=1", *extra)


def test_default_selection_reaches_the_experts_and_the_report_lists_them(tmp_path, monkeypatch, caplog):
    with caplog.at_level("INFO"):  # per-tensor pruning, so that each expert tensor is exactly at the target
        run = run_config(tmp_path, monkeypatch, "--callbacks.pruning.init_args.global_pruning=false")
    module = run.model
    (cb,) = [c for c in run.trainer.callbacks if isinstance(c, MagnitudePruning)]
    layers = emoe_layers(module.backbone)
    assert [n for n, _ in layers] == ["blocks.0.mlp"]  # the official ViT choice ([L-4, L-2], cut to the blocks) for 2 blocks
    experts = [f"backbone.{n}.{w}" for n, _ in layers for w in EXPERTS]
    assert set(experts) <= set(cb.targets) and not any(t.endswith("_bias") for t in cb.targets)
    assert cb.history[-1][1] == 0.5 and not cb.masks(module)  # the schedule's end, masks baked in
    for name in experts:  # the experts hold exactly the target share of zeros
        weight = module.get_parameter(name)
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    table = by_module_type(module, cb.targets)
    assert table["EMoEFFN"] == (2, sum(module.get_parameter(n).numel() for n in experts))
    assert "EMoEFFN" in caplog.text and "MagnitudePruning prunes" in caplog.text and not cb.untouched
    assert "train/balance_loss" in run.trainer.logged_metrics  # the other part of the composition ran too


def test_a_selection_that_leaves_every_ffn_unpruned_is_reported(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="MagnitudePruning: the selection leaves every ffn module of backbone unpruned"):
        run = run_config(tmp_path, monkeypatch, "--callbacks.pruning.init_args.patterns=[backbone.blocks.*.attn.*]")
    (cb,) = [c for c in run.trainer.callbacks if isinstance(c, MagnitudePruning)]
    assert cb.untouched == {"backbone": ["ffn", "outside"]}
    assert all(".attn." in t for t in cb.targets)


def test_structured_pruning_masks_and_removes_neurons_of_every_expert(caplog):
    seed_everything(0)
    module = Classifier(TINY_VIT, num_classes=10, model_kwargs={**TINY_VIT_KWARGS, "num_heads": 4}, surgery=[Moefy(num_experts=8, top_k=2, layers=["*"], gate_noise=0.0)])
    cb = StructuredPruning(Linear(0.5, start=0, end=4, frequency=2), ignore=["head"], make_permanent=False)
    trainer = Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[cb])
    with caplog.at_level("INFO"):
        trainer.fit(module, Digits(batch_size=32))
    assert "EMoEFFN" in caplog.text and "StructuredPruning prunes" in caplog.text
    masks = cb.masks(module)
    for name, layer in emoe_layers(module.backbone):
        alive = masks[f"backbone.{name}.fc1_weight"].amax(-1)  # (experts, neurons)
        assert alive.sum(1).tolist() == [4] * 8  # every expert lost half of its 8 neurons
        dead = alive == 0
        assert (masks[f"backbone.{name}.fc2_weight"].amax(-1) == 0).eq(dead).all() and (masks[f"backbone.{name}.fc1_bias"] == 0).eq(dead).all()
    assert [(h[1], h[2]) for h in cb.history] == [(0.25, 0.25), (0.5, 0.5)]  # attention heads (1 of 4, then 2) and expert neurons alike
    module.eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        masked = module(x)
    cb.remove_masks(module)
    cb.shrink(module, cb.applied, x[:1])
    assert all(isinstance(m, EMoEFFN) and m.fc1_weight.shape == (8, 4, 32) and m.fc2_weight.shape == (8, 4, 32) for _, m in emoe_layers(module.backbone))
    with torch.no_grad():
        torch.testing.assert_close(module(x), masked, atol=1e-5, rtol=1e-5)  # the narrower experts compute what the masked ones did
