"""EMoE (issue 16 item 14): the auxiliary load-balance loss and its weight, as in the official EMoE code.

The official scripts build every tutel MoE layer with ``is_gshard_loss=False``: tutel's ``load_importance_loss``
(``tutel/tutel/impls/losses.py``), added with weight 0.01 (``Language/search_glue_no_trainer.py --aux_loss_weight
0.01``; ``Vision/domainbed/vision_transformer.py aux_loss_weights = 0.01``); the Llama code has no router loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.batch import Batch
from zoo.emoe import BalanceLoss, EMoEFFN, EMoEModule, Moefy

N, K, T, NOISE = 4, 2, 10, 1.0


def _train_layer(aux: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's aux loss on fixed logits, and those logits with the noise the layer drew."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.ReLU(), num_experts=N, top_k=K, gate_noise=NOISE,
                    balance_loss=True, aux_loss=aux).train()
    logits = torch.randn(T, N) * 2
    layer.logits = lambda x: logits
    torch.manual_seed(1)
    layer(torch.randn(T, 8))
    torch.manual_seed(1)
    torch.randn(T, 8)
    noisy = logits + torch.randn(T, N) * NOISE / N  # the same draw: the layer adds gate_noise * randn / N (tutel)
    return layer.aux_loss, logits, noisy


def test_official_load_importance_loss_by_hand():
    loss, logits, noisy = _train_layer("load_importance")
    probs = logits.softmax(1)  # importance: probabilities without noise
    importance = probs.sum(0)
    l_imp = importance.var() / importance.mean() ** 2
    top = noisy.softmax(1).topk(K, dim=1).indices
    threshold = torch.stack([noisy[t, top[t, -1]] for t in range(T)])  # each token's k-th noisy logit
    load = torch.stack([sum(Normal(0.0, NOISE / N).cdf(probs[t, e] - threshold[t]) for t in range(T)) for e in range(N)])
    l_load = load.var() / load.mean() ** 2
    torch.testing.assert_close(loss, (l_imp + l_load) / 2, atol=1e-6, rtol=1e-5)


def test_tutel_gshard_loss_counts_first_choices_only():
    loss, _, noisy = _train_layer("gshard")
    scores = noisy.softmax(1)
    first = scores.argmax(1)
    by_hand = sum(N * (first == e).float().mean() * scores[:, e].mean() for e in range(N))
    torch.testing.assert_close(loss, by_hand, atol=1e-6, rtol=1e-5)
    ours, _, _ = _train_layer("gshard_topk")  # ours: the share over all k choices
    share = torch.bincount(scores.topk(K, dim=1).indices.reshape(-1), minlength=N).float() / (T * K)
    torch.testing.assert_close(ours, N * (share * scores.mean(0)).sum(), atol=1e-6, rtol=1e-5)


def test_default_weight_is_official_per_family():
    assert Moefy().aux_loss == "load_importance" and Moefy().capacity_factor is None  # None: the family's (tests/fidelity/test_emoe_routing_defaults.py)
    vit = EMoEModule(TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=8, top_k=2, layers=["*"])
    terms = [t for t in vit.losses if isinstance(t, BalanceLoss)]
    assert vit.balance_loss_weight == 0.01 and len(terms) == 1 and terms[0].weight == 0.01 and terms[0].reduction == "sum"
    vit.configure_model()
    assert all(layer.balance_loss and layer.aux_kind == "load_importance" for _, layer in vit.emoe_layers())
    # the official scripts add weight * l_aux for every MoE layer: the sum over layers
    batch = Batch(torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)))
    loss, logits, _ = vit.train().training_loss(batch)
    aux = [layer.aux_loss for _, layer in vit.emoe_layers()]
    assert len(aux) == 2
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.targets) + 0.01 * (aux[0] + aux[1]))
    llama = EMoEModule("hf/llama", pretrained=False, num_experts=4, top_k=2, layers=[0],
                       model_kwargs=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=32, vocab_size=50))
    assert llama.balance_loss_weight == 0.0 and not any(isinstance(t, BalanceLoss) for t in llama.losses)
    off = EMoEModule(TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=8, top_k=2, layers=["*"], balance_loss_weight=0.0)
    assert not any(isinstance(t, BalanceLoss) for t in off.losses)
