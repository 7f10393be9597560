"""Issue 16 item 7: ``fulltune: false`` trains the stitching layers and the anchors' cls tokens, as the official code
(``'stitch_layers' in name or 'cls' in name``); ours also trains the heads (fresh ones must learn the task)."""

from __future__ import annotations

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.snnet import SNNetModule


def anchor(width: int) -> dict:
    return {"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": width, "depth": 2}}


def test_fulltune_false_trains_stitching_layers_cls_tokens_and_heads():
    module = SNNetModule([anchor(32), anchor(16)], fulltune=False)
    trained = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert {"anchors.0.cls_token", "anchors.1.cls_token"} <= trained
    assert any(n.startswith("stitch_layers.") for n in trained)
    assert all(n.startswith(("stitch_layers.", "heads.")) or n.endswith(".cls_token") for n in trained)
    assert not any(p.requires_grad for n, p in module.net.anchors.named_parameters() if n != "cls_token" and not n.endswith(".cls_token"))
    full = {n for n, p in SNNetModule([anchor(32), anchor(16)]).net.named_parameters() if p.requires_grad}
    assert trained < full
