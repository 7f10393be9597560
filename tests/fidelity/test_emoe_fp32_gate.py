"""EMoE (issue 16 item 15): the router runs in float32 under mixed precision (official ``fp32_gate: True``; tutel
casts the tokens and the gate weights to float32 and, on CUDA, turns autocast off for the routing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.emoe import EMoEFFN, Moefy


def _layer(gate: str, **kw) -> EMoEFFN:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    return EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=4, top_k=2, gate=gate, **kw).eval()


@pytest.mark.parametrize("gate", ["emergent", "learned"])
def test_gate_logits_are_float32_under_bf16_autocast(gate):
    layer = _layer(gate)
    assert layer.fp32_gate and Moefy().fp32_gate
    x = torch.randn(6, 16)
    reference = layer.logits(x)  # float32 everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.logits(x)
        y = layer(x)  # the experts run in bf16 (sparse dispatch under autocast)
    assert logits.dtype == torch.float32
    if gate == "emergent":
        torch.testing.assert_close(logits, x @ layer.mean_keys().t(), atol=0, rtol=0)
    torch.testing.assert_close(logits, reference, atol=0, rtol=0)
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)


def test_without_fp32_gate_autocast_routes_in_bf16():
    layer = _layer("emergent", fp32_gate=False)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.logits(x)
    assert logits.dtype == torch.bfloat16


def test_bf16_model_routes_on_float32_logits():
    layer = _layer("emergent").to(torch.bfloat16)
    x = torch.randn(6, 16).to(torch.bfloat16)
    logits = layer.logits(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ layer.mean_keys().float().t(), atol=0, rtol=0)
