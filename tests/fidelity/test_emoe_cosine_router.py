"""EMoE (issue 16 item 16): EMoE-learn's router is tutel's cosine router (qiuzh20/EMoE ``tutel/tutel/gates/cosine_top.py``).

``logits = normalize(P x) @ normalize(S, dim=0) * exp(min(t, log(1/0.01)))`` with ``P = Linear(d, 256)``,
``S (256, N) ~ N(0, 0.01^2)``, ``t`` learned from ``log(1/0.5)``; the chosen experts' outputs are weighted by their
softmax probabilities renormalised over the top-k (tutel's ``normalize_gate``), each expert holding ``bias / k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from zoo.emoe import EMoEFFN, Moefy, moefy
from zoo.emoe.routing import CosineRouter

D, W, N, K = 8, 16, 4, 2


def _layer(**kw) -> tuple[EMoEFFN, nn.Linear, nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(D, W), nn.Linear(W, D)
    labels = torch.arange(N).repeat_interleave(W // N)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=N, top_k=K, gate="learned", labels=labels, **kw)
    return layer, fc1, fc2, labels


def test_learned_gate_defaults_to_the_official_cosine_router():
    assert Moefy(gate="learned").router == "cosine"
    layer, *_ = _layer()
    r = layer.router
    assert isinstance(r, CosineRouter)
    assert r.cosine_projector.in_features == D and r.cosine_projector.out_features == 256 and r.cosine_projector.bias is not None
    assert r.sim_matrix.shape == (256, N) and 0.005 < r.sim_matrix.std().item() < 0.015
    torch.testing.assert_close(r.temperature, torch.tensor([math.log(2.0)]))
    assert r.clamp_max == math.log(100.0)


def test_cosine_logits_and_output_weights_by_hand():
    layer, fc1, fc2, labels = _layer(capacity_factor=0.0)
    layer.eval()
    r = layer.router
    x = torch.randn(5, D)
    proj = x @ r.cosine_projector.weight.t() + r.cosine_projector.bias
    cos = torch.stack([torch.stack([F.cosine_similarity(p, r.sim_matrix[:, e], dim=0) for e in range(N)]) for p in proj])
    torch.testing.assert_close(layer.logits(x), cos * 2.0, atol=1e-6, rtol=1e-5)  # exp(log 2)
    with torch.no_grad():
        r.temperature.fill_(10.0)  # clamped at log(100)
    torch.testing.assert_close(layer.logits(x), cos * 100.0, atol=1e-5, rtol=1e-5)
    logits = layer.logits(x)
    with torch.no_grad():
        y = layer(x)
    expected = []
    for t, l in zip(x, logits):
        p = l.softmax(0)
        top = p.topk(K).indices
        out = torch.zeros(D)
        for e in top:
            rows = labels == e
            expert = fc2.weight[:, rows] @ F.gelu(fc1.weight[rows] @ t + fc1.bias[rows]) + fc2.bias / K
            out = out + p[e] / p[top].sum() * expert
        expected.append(out)
    torch.testing.assert_close(y, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_cosine_router_trains_and_the_linear_router_stays_an_option():
    layer, *_ = _layer()
    layer.train()
    layer(torch.randn(12, D)).pow(2).sum().backward()
    r = layer.router
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (r.temperature, r.cosine_projector.weight, r.sim_matrix))
    linear, fc1, *_ = _layer(router="linear")  # ours: a linear router started from the mean keys, weights top_k * softmax
    assert isinstance(linear.router, nn.Parameter)
    torch.testing.assert_close(linear.router.detach(), linear.mean_keys())
    model = moefy(nn.Sequential(Mlp(D, W)), N, K, gate="learned")  # moefy and Moefy default to it too
    assert isinstance(model[0].router, CosineRouter)
