"""E3VA (zoo.adapters.e3va): adapters on a gradient highway; backward never enters the frozen backbone."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from lightning.pytorch import Trainer

import zoo
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, tiny_base_checkpoint
from tests.zoo.test_families import TINY
from zoo import families
from zoo.adapters.e3va import E3VA, highway_of
from zoo.backbones import build_backbone

TRANSFORMERS = ["vit", "swin", "bert", "llama", "gpt2"]


def _loss(y) -> torch.Tensor:
    return y.float().pow(2).mean()


def _saved(model, x) -> tuple[list[torch.Size], torch.Tensor]:
    """Shapes of the non-parameter tensors autograd saves for backward during ``model(x)``, and the output."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return shapes, y


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_highway_starts_plain_and_only_the_adapters_get_gradients(name):
    torch.manual_seed(0)
    plain, _, _, x = TINY[name]()
    plain.eval()
    model = E3VA(rank=4).apply(copy.deepcopy(plain)).eval()
    root = families.root_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)  # up projections start at zero
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("e3va.adapters.") for n in trainable)
    assert len(highway_of(model).adapters) == len(families.blocks(model))
    with torch.no_grad():
        for a in highway_of(model).adapters:
            a.up.weight.normal_(std=0.1)
    y = model(x)
    assert not torch.allclose(y, plain(x))
    _loss(y).backward()
    assert all(p.grad is None for n, p in root.named_parameters() if not n.startswith("e3va."))  # backbone: no gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in root.named_parameters() if n.startswith("e3va."))


def test_autograd_saves_no_backbone_activation():
    """E3VA saves, per block, only its adapter's input and rank-r state, plus the final norm's input and statistics;
    full finetuning saves 16 tensors per ViT block (norms, qkv, attention, MLP)."""
    x = torch.randn(2, 1, 8, 8)
    tokens = 2 * ((8 // 2) ** 2 + 1)  # batch x (patches + class token), as the linear layers flatten them

    def saved(e3va: bool, depth: int) -> Counter:
        torch.manual_seed(0)
        model = build_backbone(TINY_VIT, **{**TINY_VIT_KWARGS, "depth": depth})
        model = E3VA(rank=4).apply(model) if e3va else model
        return Counter(tuple(s) for s in _saved(model, x)[0])

    adapters = Counter({(tokens, 32): 2, (tokens, 4): 2})  # two blocks: the adapter inputs and their rank-4 states
    final_norm = Counter({(2, 17, 32): 1, (2, 17, 1): 2})  # input, mean, rstd of the last LayerNorm (the gradient passes it)
    assert saved(True, 2) == adapters + final_norm
    assert saved(True, 4) - saved(True, 2) == adapters  # two more blocks: two more adapters, nothing of the blocks
    assert sum((saved(False, 4) - saved(False, 2)).values()) == 2 * 16


def test_swin_highway_goes_through_the_backbone_downsampling():
    torch.manual_seed(0)
    plain = build_backbone("timm/swin_tiny_patch4_window7_224", img_size=16, patch_size=2, in_chans=1, embed_dim=8, depths=(1, 1),
                           num_heads=(1, 1), window_size=4).eval()
    model = E3VA(rank=2).apply(copy.deepcopy(plain)).eval()
    highway = highway_of(model)
    assert highway.entries == {"layers.0": "layers.0.downsample", "layers.1": "layers.1.downsample"}
    assert [a.up.out_features for a in highway.adapters] == [8, 16]  # stage widths
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=0)
        highway.adapters[0].up.weight.normal_()  # only the first stage's adapter: reaches the output through patch merging
    _loss(model(x)).backward()
    assert highway.adapters[0].up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("e3va."))


def test_training_leaves_the_backbone_untouched_and_undo_gives_the_inference_form(tmp_path):
    torch.manual_seed(0)
    module = zoo.Classifier(model=TINY_VIT, model_kwargs=TINY_VIT_KWARGS, num_classes=10, surgery=[E3VA(rank=4)],
                            optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if not n.startswith("e3va.")}
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Digits(samples_per_class=4, batch_size=8))
    assert all(torch.equal(p, before[n]) for n, p in module.backbone.named_parameters() if n in before)
    assert not highway_of(module).is_zero()
    x = torch.randn(3, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        adapted = module(x)
        plain = module.unload_surgery()
        assert type(plain).__name__ == "VisionTransformer" and highway_of(plain) is not None  # inference form: highway kept
        torch.testing.assert_close(module(x), adapted, atol=0, rtol=0)
    assert all(p.requires_grad for n, p in plain.named_parameters() if not n.startswith("e3va."))  # thawed

    fresh = E3VA(rank=4).apply(build_backbone(TINY_VIT, **TINY_VIT_KWARGS))
    assert highway_of(E3VA().undo(fresh)) is None  # zero highway: removed, the exact plain model


@pytest.mark.parametrize("name", ["resnet", "efficientnet"])
def test_families_without_transformer_blocks_fail_before_training(name):
    backbone = TINY[name]()[0]
    with pytest.raises(ValueError, match=f"E3VA: the {name} family .* needs transformer blocks: \\['vit', 'swin', 'bert', 'llama', 'gpt2'\\]"):
        E3VA().apply(backbone)


def test_bad_arguments():
    with pytest.raises(ValueError, match="E3VA does not know the layers of"):
        E3VA().apply(build_backbone("zoo/convnet"))
    with pytest.raises(ValueError, match="rank=0"):
        E3VA(rank=0)
    with pytest.raises(ValueError, match="tap='ffn'"):
        E3VA(tap="ffn")
    with pytest.raises(ValueError, match="rank=64 is larger than the blocks' width 32"):
        E3VA(rank=64).apply(build_backbone(TINY_VIT, **TINY_VIT_KWARGS))


def test_trained_only_checkpoint_reloads_the_highway(tmp_path):
    from zoo.backbones import load_zoo_module

    data, kw = tiny_base_checkpoint(tmp_path / "base.ckpt")
    module = zoo.Classifier(model=str(tmp_path / "base.ckpt"), num_classes=4, surgery=[E3VA(rank=4)],
                            optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    trainer = Trainer(max_steps=2, **kw)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "adapted.ckpt")
    saved = torch.load(tmp_path / "adapted.ckpt", weights_only=True)["state_dict"]
    assert "backbone.blocks.0.attn.qkv.weight" not in saved and "backbone.e3va.adapters.0.up.weight" in saved
    reloaded = load_zoo_module(tmp_path / "adapted.ckpt").eval()
    x = torch.randn(5, 1, 8, 8)
    assert not highway_of(module).is_zero()
    assert torch.equal(reloaded(x), module.eval()(x))
