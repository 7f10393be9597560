"""EMoE (issue 16 item 15): expert dropout as the official runs.

Official (qiuzh20/EMoE): BERT and GPT-2 (``Language/moe_utils.py``): the experts' activation is ``dropout_gelu``:
``gelu(dropout(x))``, dropout on the hidden pre-activations, p = ``moe_drop`` (default 0.1). ViT
(``Vision/domainbed/vision_transformer.py``): ``activation_fn: lambda x: self.moe_drop(F.gelu(x))`` with
``moe_drop = nn.Dropout(0.1)``: after the activation. The Llama code has none.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo.test_emoe import tiny
from zoo.emoe import EMoEFFN, Moefy, emoe_layers, moefy


@pytest.mark.parametrize("family,p,after", [("bert", 0.1, False), ("gpt2", 0.1, False), ("llama", 0.0, False), ("timm", 0.1, True)])
def test_default_expert_dropout_per_family(family, p, after):
    layers = emoe_layers(moefy(tiny(family), num_experts=4, top_k=2))
    assert layers
    for _, m in layers:
        assert (isinstance(m.expert_dropout, nn.Dropout) and m.expert_dropout.p == p) if p else isinstance(m.expert_dropout, nn.Identity)
        assert m.dropout_after_act == after
    assert Moefy().expert_dropout is None  # None: the family's official value
    off = emoe_layers(moefy(tiny(family), num_experts=4, top_k=2, expert_dropout=0.0))
    assert all(isinstance(m.expert_dropout, nn.Identity) for _, m in off)


def test_dropout_is_on_the_pre_activation_in_training_only():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    # top_k = N, no noise: every expert runs on every token in one call, so the dropout mask is one draw of (T, H)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=4, top_k=4, expert_dropout=0.5).train()
    x = torch.randn(5, 8)
    w1, b1 = layer.fc1_weight.detach().reshape(16, 8), layer.fc1_bias.detach().reshape(16)
    w2 = layer.fc2_weight.detach().reshape(16, 8)
    pre = x @ w1.t() + b1
    torch.manual_seed(3)
    y = layer(x).detach()
    torch.manual_seed(3)
    dropped = F.dropout(pre, 0.5, training=True)
    torch.testing.assert_close(y, F.gelu(dropped) @ w2 + fc2.bias.detach(), atol=1e-6, rtol=1e-5)  # gelu(dropout(x))
    after = F.gelu(pre) * (dropped != 0) / 0.5  # dropout(gelu(x)), the same mask: not what the official code does
    assert (y - (after @ w2 + fc2.bias.detach())).abs().max() > 1e-3
    layer.eval()
    torch.testing.assert_close(layer(x), F.gelu(pre) @ w2 + fc2.bias, atol=1e-6, rtol=1e-5)


def test_vit_dropout_is_after_the_activation():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=4, top_k=4, expert_dropout=0.5,
                    dropout_after_act=True).train()
    x = torch.randn(5, 8)
    pre = x @ layer.fc1_weight.detach().reshape(16, 8).t() + layer.fc1_bias.detach().reshape(16)
    torch.manual_seed(3)
    y = layer(x).detach()
    torch.manual_seed(3)
    after = F.dropout(F.gelu(pre), 0.5, training=True)  # dropout(gelu(x)), the official ViT experts
    torch.testing.assert_close(y, after @ layer.fc2_weight.detach().reshape(16, 8) + fc2.bias.detach(), atol=1e-6, rtol=1e-5)
