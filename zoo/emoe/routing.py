"""Routing of :class:`~zoo.emoe.layers.EMoEFFN` as the official EMoE code does it with tutel (qiuzh20/EMoE, ``tutel/``):
the cosine router (``gates/cosine_top.py``), the expert capacity and the order in which tokens are dropped
(``impls/fast_dispatch.py: extract_critical``, ``batch_prioritized_routing=True`` in every official script), and the
auxiliary losses (``impls/losses.py``; the official scripts pass ``is_gshard_loss=False``: the load + importance loss).

Mixed precision: routing is float32, as tutel's (``impls/moe_layer.py`` runs ``routing()`` with autocast off, and every
official EMoE script builds its gates with ``fp32_gate: True``, ``moe_utils.py``): the layer computes its logits in
float32 (:meth:`~zoo.emoe.layers.EMoEFFN.logits`), and the softmax, capacity order and auxiliary losses here upcast
whatever they are given; only the experts run in the autocast dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("cosine", "linear")
AUX_LOSSES = ("load_importance", "gshard", "gshard_topk")


class CosineRouter(nn.Module):
    """Tutel's ``CosineTopKGate`` (EMoE-learn's router): logits ``cos(P x, s_e) * exp(min(t, log 100))``.

    ``P``: a ``Linear(dim, proj_dim)`` (with bias, default init); ``s_e``: columns of ``sim_matrix (proj_dim, N)``,
    initialised ``N(0, 0.01^2)``; ``t``: a learned log inverse temperature starting at ``log(1 / init_t)``.
    """

    def __init__(self, dim: int, num_experts: int, proj_dim: int = 256, init_t: float = 0.5):
        super().__init__()
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dim, num_experts).normal_(0, 0.01))
        self.clamp_max = math.log(1.0 / 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, sim = self.cosine_projector.weight, self.cosine_projector.bias, self.sim_matrix
        logits = F.normalize(F.linear(x, w.to(x.dtype), b.to(x.dtype)), dim=1) @ F.normalize(sim.to(x.dtype), dim=0)
        return logits * torch.clamp(self.temperature, max=self.clamp_max).exp().to(x.dtype)


def capacity(tokens: int, num_experts: int, top_k: int, factor: float) -> int | None:
    """Slots per expert: ``top_k * int(factor * ceil(tokens / num_experts))`` as tutel; None (no limit) when ``factor == 0``."""
    if factor <= 0:
        return None
    return top_k * int(factor * ((tokens + num_experts - 1) // num_experts))


def kept(probs: torch.Tensor, idx: torch.Tensor, cap: int | None, prioritized: bool = True) -> torch.Tensor | None:
    """Which routing assignments ``idx (T, k)`` fit in the experts' capacity ``cap`` (bool ``(T, k)``; None: all).

    Tutel's order: every token's first choice is placed before any second choice (and so on); within one rank,
    tokens go in order of their highest routing probability (``batch_prioritized_routing``), else in token order.
    An assignment whose slot ``>= cap`` is dropped: its expert output (and its share of the bias) is zero.
    """
    if cap is None or cap >= len(idx):  # an expert gets at most one assignment per token: nothing can overflow
        return None
    num_experts = probs.shape[1]
    order = torch.argsort(-probs.max(1).values, stable=True) if prioritized else torch.arange(len(idx), device=idx.device)
    keep = torch.empty_like(idx, dtype=torch.bool)
    base = torch.zeros(num_experts, dtype=torch.long, device=idx.device)
    for r in range(idx.shape[1]):
        onehot = F.one_hot(idx[order, r], num_experts)
        slot = (onehot.cumsum(0) - 1 + base) * onehot
        keep[order, r] = slot.sum(1) < cap
        base = base + onehot.sum(0)
    return keep


def load_importance_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, idx: torch.Tensor, gate_noise: float) -> torch.Tensor:
    """Tutel's ``load_importance_loss`` (the official EMoE aux loss): ``(cv^2(importance) + cv^2(load)) / 2``.

    importance ``= sum_t p_t`` with ``p = softmax(logits)`` (no noise); load ``= sum_t Phi((p_t - thr_t) / sigma)`` with
    ``thr_t`` the token's k-th largest noisy logit and ``sigma = gate_noise / N`` (tutel compares probabilities
    with logits: kept as is); ``cv^2 = var / (mean^2 + 1e-10)``, unbiased variance. ``gate_noise == 0`` (tutel
    refuses it) takes the limit: a step function.
    """
    num_experts = logits.shape[1]
    probs = logits.float().softmax(1)

    def cv2(v: torch.Tensor) -> torch.Tensor:
        return v.var() / (v.mean() ** 2 + 1e-10)

    threshold = noisy_logits.float().gather(1, idx)[:, -1:]
    diff = probs - threshold
    sigma = gate_noise / num_experts
    prob = 0.5 * (1 + torch.erf(diff / (sigma * math.sqrt(2)))) if sigma > 0 else (diff > 0).float()
    return (cv2(probs.sum(0)) + cv2(prob.sum(0))) / 2


def gshard_loss(noisy_logits: torch.Tensor, idx: torch.Tensor, topk: bool = False) -> torch.Tensor:
    """Tutel's ``gshard_loss``: ``N * sum_e f_e * P_e`` with ``P_e`` the mean of ``softmax(noisy logits)`` and ``f_e`` the
    fraction of tokens whose first choice is ``e`` (1 when balanced). ``topk``: ``f_e`` over all ``k`` choices (ours)."""
    num_experts = noisy_logits.shape[1]
    scores = noisy_logits.float().softmax(1)
    chosen = idx if topk else idx[:, :1]
    share = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(scores.dtype) / chosen.numel()
    return num_experts * (share * scores.mean(0)).sum()


def aux_loss(kind: str, logits: torch.Tensor, noisy_logits: torch.Tensor, idx: torch.Tensor, gate_noise: float) -> torch.Tensor:
    if kind == "load_importance":
        return load_importance_loss(logits, noisy_logits, idx, gate_noise)
    return gshard_loss(noisy_logits, idx, topk=kind == "gshard_topk")


def check_routing(router: str, capacity_factor: float, aux: str, expert_dropout: float) -> None:
    if router not in ROUTERS:
        raise ValueError(f"router={router!r}: expected one of {ROUTERS}")
    if not capacity_factor >= 0:
        raise ValueError(f"capacity_factor={capacity_factor}: expected >= 0 (0: no capacity limit)")
    if aux not in AUX_LOSSES:
        raise ValueError(f"aux_loss={aux!r}: expected one of {AUX_LOSSES}")
    if not 0 <= expert_dropout < 1:
        raise ValueError(f"expert_dropout={expert_dropout}: expected in [0, 1)")
