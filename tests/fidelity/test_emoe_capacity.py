"""EMoE (issue 16 item 14): tutel's expert capacity and token dropping, as in the official EMoE code.

Tutel (qiuzh20/EMoE ``tutel/tutel/impls/fast_dispatch.py: extract_critical``): capacity per expert
``top_k * int(capacity_factor * ceil(T / N))`` (official factor 1.5); every first choice takes a slot before any
second choice; within a rank, with ``batch_prioritized_routing=True`` (all official scripts), tokens with the
highest routing probability go first. An assignment past the capacity is dropped: its expert output and its share
(``bias / top_k``) of the output bias are zero; the block's residual carries the token.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.emoe import EMoEFFN
from zoo.emoe.routing import capacity


def _layer(num_experts: int, top_k: int, factor: float, prioritized: bool = True, dim: int = 6, width: int = 12) -> tuple[EMoEFFN, nn.Linear, nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(dim, width), nn.Linear(width, dim)
    labels = torch.arange(num_experts).repeat_interleave(width // num_experts)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=num_experts, top_k=top_k, labels=labels,
                    capacity_factor=factor, batch_prioritized=prioritized).eval()
    return layer, fc1, fc2, labels


def _by_hand(x, fc1, fc2, labels, routes: list[list[int]], k: int) -> torch.Tensor:
    """Per token: the sum over its KEPT experts of ``W2_e gelu(W1_e x + b1_e) + b2 / k`` (tutel's per-expert bias b2/k)."""
    out = []
    for t, experts in zip(x, routes):
        y = torch.zeros(fc2.out_features)
        for e in experts:
            rows = labels == e
            y = y + fc2.weight[:, rows] @ nn.functional.gelu(fc1.weight[rows] @ t + fc1.bias[rows]) + fc2.bias / k
        out.append(y)
    return torch.stack(out)


def test_capacity_formula_is_tutels():
    assert capacity(6, 2, 1, 1.0) == 3
    assert capacity(4, 3, 2, 0.5) == 2 * int(0.5 * 2)
    assert capacity(100, 8, 2, 1.5) == 2 * int(1.5 * 13) == 38
    assert capacity(100, 8, 2, 0.0) is None  # 0: no limit


@pytest.mark.parametrize("prioritized,kept", [(True, [0, 2, 3]), (False, [0, 1, 2])])
@pytest.mark.parametrize("dispatch", ["sparse", "masked"])
def test_top1_overflowing_expert_drops_the_lowest_priority_tokens(prioritized, kept, dispatch):
    layer, fc1, fc2, labels = _layer(num_experts=2, top_k=1, factor=1.0, prioritized=prioritized)
    layer.dispatch = dispatch
    # five tokens choose expert 0, whose capacity is 1 * int(1.0 * ceil(6 / 2)) = 3; max probabilities
    # t0 .881, t1 .622, t2 .953, t3 .731, t4 .525: by priority t2, t0, t3 keep their slots; in token order t0, t1, t2
    logits = torch.tensor([[2.0, 0], [0.5, 0], [3.0, 0], [1.0, 0], [0.1, 0], [0, 1.0]])
    layer.logits = lambda x: logits
    x = torch.randn(6, 6)
    with torch.no_grad():
        y = layer(x)
    routes = [[0] if t in kept else [] for t in range(5)] + [[1]]
    torch.testing.assert_close(y, _by_hand(x, fc1, fc2, labels, routes, k=1), atol=1e-6, rtol=1e-5)
    dropped = [t for t in range(5) if t not in kept]
    assert torch.equal(y[dropped], torch.zeros(2, 6))  # expert output zero, bias included


@pytest.mark.parametrize("dispatch", ["sparse", "masked"])
def test_top2_first_choices_take_slots_before_second_choices(dispatch):
    layer, fc1, fc2, labels = _layer(num_experts=3, top_k=2, factor=0.5)
    layer.dispatch = dispatch
    # capacity 2 * int(0.5 * ceil(4 / 3)) = 2. Max probabilities: t0 .705, t1 .665, t2 .766, t3 .669 -> priority t2, t0, t3, t1.
    # First choices: e0 <- t0, t3 (kept), t1 (slot 2: dropped); e2 <- t2. Second choices start after the first ones
    # (e1 at 0, e2 at 1): e1 <- t2, t0 (kept), t3 (slot 2: dropped); e2 <- t1 (slot 1: kept).
    logits = torch.tensor([[3.0, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 2.5], [1.5, 0.2, 0.0]])
    probs = logits.softmax(1).max(1).values
    assert probs.argsort(descending=True).tolist() == [2, 0, 3, 1]
    layer.logits = lambda x: logits
    x = torch.randn(4, 6)
    with torch.no_grad():
        y = layer(x)
    routes = [[0, 1], [2], [2, 1], [0]]
    torch.testing.assert_close(y, _by_hand(x, fc1, fc2, labels, routes, k=2), atol=1e-6, rtol=1e-5)


def test_no_capacity_limit_keeps_every_assignment():
    layer, fc1, fc2, labels = _layer(num_experts=2, top_k=1, factor=0.0)
    logits = torch.tensor([[2.0, 0], [0.5, 0], [3.0, 0], [1.0, 0], [0.1, 0], [0, 1.0]])
    layer.logits = lambda x: logits
    x = torch.randn(6, 6)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, _by_hand(x, fc1, fc2, labels, [[0]] * 5 + [[1]], k=1), atol=1e-6, rtol=1e-5)
