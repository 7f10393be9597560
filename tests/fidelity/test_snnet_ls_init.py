"""Issue 16 item 4: SN-Net's least-squares init of the stitching layers, as the official recipe.

Official (ziplab/SN-Net ``stitching_deit/main.py``, SN-Netv2 ``classification/main.py``): before training, a separate
loader over the training set with batch size ``stitch_init_bs`` = 100 gives one batch (training augmentation applied),
and the features are taken with the anchors in train mode (the model is never put in eval mode first); each layer
solves ``[X 1] W = Y`` per stitching position, a layer shared by several positions taking the mean of the solutions.
"""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.batch import as_batch
from zoo.snnet import SNNetModule

DROPPY = {**TINY_VIT_KWARGS, "drop_path_rate": 0.3, "proj_drop_rate": 0.2, "attn_drop_rate": 0.2}  # train and eval features differ


class Record(Callback):
    """What the init saw: the RNG state and anchors at train start, the first training batch."""

    def on_train_start(self, trainer, pl_module):  # callbacks run before the module's hook, so before the init
        self.rng, self.anchors, self.loader = torch.get_rng_state(), copy.deepcopy(pl_module.net.anchors), trainer.train_dataloader

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.first = as_batch(batch).inputs.clone()


def block_features(anchor: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Tokens entering each block and leaving the last, through timm's ViT pieces (one forward, as the official extract_block_features)."""
    h = anchor.norm_pre(anchor.patch_drop(anchor._pos_embed(anchor.patch_embed(x))))
    feats = [h]
    for blk in anchor.blocks:
        h = blk(h)
        feats.append(h)
    return feats


def by_hand(net, anchors: torch.nn.ModuleList, images: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    """Each stitching layer's weight and bias: ``torch.linalg.lstsq`` on the features, the mean over the positions sharing it."""
    anchors.train(train)
    with torch.no_grad():
        feats = [block_features(a, images) for a in anchors]
    out = {}
    for (f, e), positions in net.positions.items():
        sols: dict[int, list[torch.Tensor]] = {}
        for j, k, layer in positions:
            x, y = feats[f][j + 1].reshape(-1, feats[f][j + 1].shape[-1]).double(), feats[e][k].reshape(-1, feats[e][k].shape[-1]).double()
            sols.setdefault(layer, []).append(torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution)
        for layer, s in sols.items():
            mean = torch.stack(s).mean(0)
            out[f"{f}-{e}.{layer}.weight"], out[f"{f}-{e}.{layer}.bias"] = mean[:-1].T.float(), mean[-1].float()
    return out


def fit_one_step(data: dict | None = None, **kw) -> tuple[SNNetModule, Record]:
    torch.manual_seed(0)
    module = SNNetModule([{"model": TINY_VIT, "model_kwargs": {**DROPPY, "embed_dim": w}} for w in (16, 32)], kernel_size=1,
                         optimizer=partial(torch.optim.SGD, lr=0.0), **kw)  # lr 0: the step leaves the initialised layers as they are
    rec = Record()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec])
    trainer.fit(module, Digits(batch_size=32, augment=True, **(data or {})))
    return module, rec


def assert_layers(module: SNNetModule, expected: dict[str, torch.Tensor]) -> None:
    got = module.net.stitch_layers.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=2e-4, rtol=1e-3, msg=k)


def test_official_init_solves_on_100_fresh_training_images_in_train_mode():
    module, rec = fit_one_step()
    assert module.hparams.init_batch_size == 100 and module.hparams.init_mode == "train"  # the defaults are the official recipe
    torch.set_rng_state(rec.rng)  # replay: the same fresh pass over the training loader, then the same dropout draws
    images = torch.cat([as_batch(b).inputs for _, b in zip(range(4), rec.loader)])[:100]
    assert len(images) == 100 and len(rec.first) == 32  # its own draw of 100 images, not the first training batch of 32
    expected = by_hand(module.net, rec.anchors, images, train=True)
    assert_layers(module, expected)
    eval_mode = by_hand(module.net, rec.anchors, images, train=False)
    assert max((eval_mode[k] - v).abs().max() for k, v in expected.items()) > 1e-2  # the mode matters with these anchors


def test_ours_solves_on_the_first_training_batch_in_eval_mode():
    module, rec = fit_one_step(init_batch_size=None, init_mode="eval")
    assert_layers(module, by_hand(module.net, rec.anchors, rec.first, train=False))


def test_bad_init_options_fail_saying_what_to_set():
    with pytest.raises(ValueError, match="init_mode='test'"):
        SNNetModule([{"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS}] * 2, init_mode="test")
    with pytest.raises(ValueError, match="init_batch_size=0"):
        SNNetModule([{"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS}] * 2, init_batch_size=0)


def test_init_images_are_transformed_when_the_datamodule_defers_its_transform():
    """``transform_on_device``: the loader yields untransformed images; the init still solves on the transformed ones."""
    plain, _ = fit_one_step()
    deferred, _ = fit_one_step(data={"transform_on_device": True})
    assert_layers(deferred, plain.net.stitch_layers.state_dict())
