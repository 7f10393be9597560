"""``zoo.pruning.PruneStructured``: the same channels as the StructuredPruning callback from the same weights, a smaller
model (parameters, FLOPs), composition on a Classifier with other surgery, checkpoints that load, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.flop_counter import FlopCounterMode

from callbacks.pruning import StructuredPruning
from callbacks.pruning_schedules import OneShot
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo import Classifier, load_zoo_module
from zoo.backbones import build_backbone
from zoo.emoe import Moefy, emoe_layers
from zoo.pruning import PruneStructured
from zoo.subtuning import Freeze

VIT4 = {**TINY_VIT_KWARGS, "num_heads": 4}  # width 32, 4 heads of 8, FFN 64, 2 blocks, 17 tokens
X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def vit(**kwargs) -> Classifier:
    return Classifier(TINY_VIT, num_classes=10, model_kwargs=VIT4, **kwargs)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def fit(module: Classifier, max_steps: int, **kwargs) -> Trainer:
    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      accelerator="cpu", **kwargs)
    trainer.fit(module, Digits(batch_size=32))
    return trainer


@pytest.mark.parametrize("case", ["vit", "emoe", "round_to", "head_dims"])
def test_same_channels_as_the_callbacks_removal_from_the_same_weights(case):
    """The surgery on the backbone and StructuredPruning's end-of-fit removal on the module (keeping the embedding
    width, which the surgery keeps because the head reads it) give the same parameters, names, shapes and values."""
    seed_everything(0)
    # no capacity limit: the masked model's mean keys differ from the narrow one's, so prioritised dropping would pick other tokens
    moefy = [Moefy(num_experts=8, top_k=2, layers=["*"], gate_noise=0.0, capacity_factor=0.0)] if case == "emoe" else []
    round_to, sparsity = (16, 0.3) if case == "round_to" else (None, 0.5)
    heads = case != "head_dims"  # else every head loses the same share of its dimensions
    module = vit(surgery=moefy)
    module.configure_model()
    reference = copy.deepcopy(module)
    cb = StructuredPruning(OneShot(sparsity), ignore=["head", "backbone.patch_embed.proj"], round_to=round_to, prune_heads=heads)
    masked = copy.deepcopy(module).eval()
    cb._example = X[:1]  # what the callback keeps from the first batch
    cb.compute_masks(masked, sparsity, None)  # the masks it trains with
    cb.shrink(reference, sparsity, X[:1])
    module.backbone = PruneStructured(sparsity, round_to=round_to, prune_heads=heads).apply(module.backbone)
    ours, theirs = module.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name, value in ours.items():
        assert value.shape == theirs[name].shape and torch.equal(value, theirs[name]), name
    attention = [(b.attn.num_heads, b.attn.head_dim) for b in module.backbone.blocks]
    assert attention == [(b.attn.num_heads, b.attn.head_dim) for b in reference.backbone.blocks] == [(2, 8) if heads else (4, 4)] * 2
    module.eval()
    reference.eval()
    with torch.no_grad():
        out = module(X)
        assert torch.equal(out, reference(X))
        torch.testing.assert_close(out, masked(X), atol=1e-5, rtol=1e-5)  # the narrower model computes what the masked one did
        for block in module.backbone.blocks:  # fused attention and timm's unfused path (with its `scale`) agree
            block.attn.fused_attn = False
        torch.testing.assert_close(module(X), out, atol=1e-5, rtol=1e-5)
    if case == "emoe":  # every expert lost half of its 8 neurons
        assert all(m.fc1_weight.shape == (8, 4, 32) and m.fc2_weight.shape == (8, 4, 32) for _, m in emoe_layers(module.backbone))
    if case == "round_to":  # 64 FFN neurons keep 32, a multiple of 16 (44 without round_to)
        assert all(b.mlp.fc1.out_features == 32 for b in module.backbone.blocks)


def test_pruned_model_is_smaller_and_faster():
    torch.manual_seed(0)
    backbone = build_backbone(TINY_VIT, **VIT4).eval()
    x = X[:1]
    dense_params, dense_flops = n_params(backbone), flops(backbone, x)
    assert PruneStructured(0.5).apply(backbone) is backbone  # in place
    assert backbone(X).shape == (6, 32)  # the output width the head reads is kept
    d, t = 32, 17
    per_block = {"qkv": (3 * 16) * (d + 1), "proj": 16 * d, "fc1": 32 * (d + 1), "fc2": 32 * d}  # 2 of 4 heads, 32 of 64 neurons
    assert n_params(backbone) == dense_params - 2 * sum(per_block.values())
    for block in backbone.blocks:
        assert (block.attn.qkv.out_features, block.attn.proj.in_features, block.mlp.fc1.out_features, block.mlp.fc2.in_features) == (48, 16, 32, 32)
    linear_saving = 2 * 2 * t * (48 + 16 + 32 + 32) * d  # 2 blocks x 2 FLOPs per multiply-add x tokens x removed weights
    assert dense_flops - flops(backbone, x) >= linear_saving > 0.45 * dense_flops

    convnet = build_backbone("zoo/convnet", widths=(8, 16))
    PruneStructured(0.5).apply(convnet)
    assert [convnet.stages[0][0].out_channels, convnet.stages[1][0].in_channels, convnet.stages[1][0].out_channels] == [4, 4, 16]
    assert convnet(torch.randn(2, 1, 8, 8)).shape == (2, 16)


def test_composes_with_freeze_frozen_layers_untouched_and_still_frozen():
    seed_everything(0)
    module = vit(surgery=[Freeze(["blocks.1"]), PruneStructured(0.5)])
    dense = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.configure_model()
    params = dict(module.named_parameters())
    for name, p in params.items():
        if ".blocks.1." in name:
            assert p.requires_grad, name
        else:  # block 0, the embeddings and the final norm: bit-identical and frozen
            assert torch.equal(p, dense[name]) and (name.startswith("head.") or not p.requires_grad), name
    assert module.backbone.blocks[1].mlp.fc1.out_features == 32 and module.backbone.blocks[1].attn.num_heads == 2
    assert module.backbone.blocks[0].mlp.fc1.out_features == 64 and module.backbone.blocks[0].attn.num_heads == 4
    assert module.unload_surgery() is module.backbone and all(p.requires_grad for p in module.backbone.parameters())  # Freeze undone
    assert module.backbone.blocks[1].mlp.fc1.out_features == 32  # pruning is not undone: the weights are gone


def test_classifier_prunes_in_configure_model_and_checkpoints_load(tmp_path):
    seed_everything(0)
    module = vit(surgery=[PruneStructured(0.5, ignore=["blocks.0.mlp.fc1"])])
    dense = n_params(module)
    assert module.hparams["surgery"] == [{"class_path": "zoo.pruning.surgery.PruneStructured", "init_args": {
        "sparsity": 0.5, "ignore": ["blocks.0.mlp.fc1"], "round_to": None, "prune_heads": True, "input_shape": None}}]
    trainer = fit(module, max_steps=2, enable_checkpointing=False)
    assert trainer.global_step == 2 and module.surgery_applied
    assert [b.mlp.fc1.out_features for b in module.backbone.blocks] == [64, 32]  # fc1 of block 0 ignored
    assert n_params(module) < dense
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    module.eval()
    with torch.no_grad():
        expected = module(X)
    for loaded in (Classifier.load_from_checkpoint(path), load_zoo_module(path)):  # rebuilt and pruned, then loaded
        loaded.eval()
        assert n_params(loaded) == n_params(module)
        with torch.no_grad():
            assert torch.equal(loaded(X), expected)
    resumed = vit(surgery=[PruneStructured(0.5, ignore=["blocks.0.mlp.fc1"])])
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, accelerator="cpu")
    trainer.fit(resumed, Digits(batch_size=32), ckpt_path=path)
    assert trainer.global_step == 3 and n_params(resumed) == n_params(module)


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, r"sparsity=1.0 is outside \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity=-0.1 is outside \[0, 1\)"),
    ({"sparsity": 0.5, "round_to": 0}, r"round_to=0"),
    ({"sparsity": 0.5, "input_shape": [1, 0, 8]}, r"input_shape=\[1, 0, 8\]"),
    ({"sparsity": 0.5, "ignore": "head"}, r"ignore='head'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneStructured(**kwargs)


def test_an_ignore_pattern_matching_nothing_fails_before_pruning():
    module = vit(surgery=[PruneStructured(0.5, ignore=["blocks.*.mlp.fc9"])])
    with pytest.raises(ValueError, match=r"PruneStructured: ignore pattern 'blocks.\*.mlp.fc9' matches no module of VisionTransformer; "
                                         r"candidates: .*blocks\.\d\.mlp\.fc\d"):
        module.configure_model()
    assert module.backbone.blocks[0].mlp.fc1.out_features == 64


def test_nothing_to_prune_warns_and_zero_sparsity_is_a_no_op():
    backbone = build_backbone(TINY_VIT, **VIT4).requires_grad_(False)
    with pytest.warns(UserWarning, match=r"PruneStructured\(sparsity=0.5.*removed nothing from VisionTransformer"):
        PruneStructured(0.5).apply(backbone)
    backbone = build_backbone(TINY_VIT, **VIT4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    PruneStructured(0.0).apply(backbone)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    mlp = build_backbone("zoo/mlp", in_chans=1, img_size=8, hidden=(16, 16))
    assert PruneStructured(0.5).example(mlp).shape == (1, 64)  # the input shape is inferred from the first linear
    PruneStructured(0.5).apply(mlp)
    assert [m.out_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [8, 16]


def test_prune_then_finetune_config(tmp_path, monkeypatch):
    """configs/pruning/vit_prune_then_finetune.yaml (on its stand-in ViT): pruned at build time, then trained."""
    from tests.helpers import ROOT
    from tests.standin import fit_config

    run = fit_config(ROOT / "configs" / "pruning" / "vit_prune_then_finetune.yaml", tmp_path, monkeypatch, "--trainer.max_steps=2",
                     "--data.init_args.batch_size=16")
    blocks = run.model.backbone.blocks
    assert [(b.mlp.fc1.out_features, b.attn.num_heads, b.attn.head_dim) for b in blocks] == [(48, 3, 8)] * 2  # from (96, 3, 16)
    assert run.trainer.global_step == 2 and run.model.head.in_features == 48
