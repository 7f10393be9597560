"""Issue 16 item 6: a hub anchor keeps its own classification head when its class count is the task's (official SN-Net
builds the anchors with ``num_classes=nb_classes`` and keeps their pretrained heads); otherwise a fresh ``Linear``."""

from __future__ import annotations

import timm
import torch

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.snnet import Anchors


def test_hub_anchor_keeps_its_head_when_the_class_count_matches():
    kwargs = {**TINY_VIT_KWARGS, "num_classes": 5}
    torch.manual_seed(3)
    reference = timm.create_model(TINY_VIT.split("/", 1)[1], pretrained=False, **kwargs)
    torch.manual_seed(3)
    anchors = Anchors.build([{"model": TINY_VIT, "model_kwargs": kwargs}], num_classes=5)
    head = anchors.heads[0]
    assert torch.equal(head.weight, reference.head.weight) and torch.equal(head.bias, reference.head.bias)
    x = torch.randn(2, 1, 8, 8)
    reference.eval(), anchors.eval()
    torch.testing.assert_close(head(anchors.backbones[0](x)), reference(x))  # the anchor is the model, head included


def test_other_class_count_gets_a_fresh_head():
    kwargs = {**TINY_VIT_KWARGS, "num_classes": 5}
    anchors = Anchors.build([{"model": TINY_VIT, "model_kwargs": kwargs}, {"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS}], num_classes=7)
    assert all(h.out_features == 7 for h in anchors.heads) and all(b.num_classes == 0 for b in anchors.backbones)
