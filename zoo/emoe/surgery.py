"""``Moefy``: EMoE as a model surgery (``transform`` = :func:`~zoo.emoe.convert.moefy` in place,
``undo`` = :func:`~zoo.emoe.convert.demoefy`, a plain model of the original classes)::

    model:
      class_path: zoo.Classifier
      init_args:
        model: timm/vit_tiny_patch16_224
        surgery:
          - class_path: zoo.emoe.Moefy
            init_args: {num_experts: 8, top_k: 2, layers: ["*"]}
        losses:
          - class_path: zoo.losses.CrossEntropy
          - class_path: zoo.emoe.BalanceLoss      # needs balance_loss: true on Moefy
            init_args: {weight: 0.01}
"""

from __future__ import annotations

from torch import nn

from zoo.emoe.convert import SUPPORTED, demoefy, emoe_layers, ffn_width, find_ffns, moefy, paper_defaults, select_layers
from zoo.emoe.layers import GATES, _check_args
from zoo.emoe.routing import check_routing
from zoo.surgery import Surgery


class Moefy(Surgery):
    """Turn the chosen dense FFNs of the backbone into :class:`~zoo.emoe.layers.EMoEFFN` layers.

    Args:
        num_experts, top_k: experts per FFN and experts per token; None takes the official setting for the
            model family (:mod:`zoo.emoe.defaults`: BERT 64 / 16, GPT-2 64 / 32, Llama 64 / 16, ViT 24 / 4), or
            ``top_k = num_experts // 4`` when only ``num_experts`` is given.
        layers: FFNs to convert, by index among the model's FFNs or by name (fnmatch patterns work, ``["*"]``
            is every FFN); None: the official choice for the family, scaled by depth (:mod:`zoo.emoe.defaults`).
        gate: ``emergent`` (mean keys, not trained: the paper's avg-k) or ``learned``.
        gate_noise: Gaussian noise on the routing scores in training (std ``gate_noise / num_experts``); None: the
            family's official one (1, none for Llama).
        balance_loss: the layers compute the auxiliary load-balance loss (read by :class:`~zoo.emoe.BalanceLoss`).
        cluster_seed, cluster_inits: seed and number of restarts of the balanced k-means (official: 10 restarts).
        router, capacity_factor, batch_prioritized, fp32_gate, aux_loss: as :class:`~zoo.emoe.layers.EMoEFFN`, official
            defaults (cosine router for ``gate: learned``, capacity factor 1.5 (None: the family's, no limit for Llama),
            prioritised dropping, fp32 gate, tutel's load + importance loss).
        expert_dropout: dropout inside the experts; None: the family's official ``moe_drop`` (0.1 for BERT / GPT-2 /
            ViT, after the activation for ViT).
    """

    def __init__(self, num_experts: int | None = None, top_k: int | None = None, layers: list[int | str] | None = None,
                 gate: str = "emergent", gate_noise: float | None = None, balance_loss: bool = False, cluster_seed: int = 0,
                 cluster_inits: int = 10, router: str = "cosine", capacity_factor: float | None = None, batch_prioritized: bool = True,
                 fp32_gate: bool = True, expert_dropout: float | None = None, aux_loss: str = "load_importance"):
        check_routing(router, capacity_factor or 0.0, aux_loss, expert_dropout or 0.0)
        if gate not in GATES:
            raise ValueError(f"Moefy: gate={gate!r}: expected one of {GATES}")
        noise = gate_noise or 0.0
        if num_experts is not None:
            _check_args(num_experts, top_k or 1, gate, "sparse", noise, cluster_inits=cluster_inits)
        elif noise < 0 or not isinstance(cluster_inits, int) or cluster_inits < 1:
            _check_args(1, 1, gate, "sparse", noise, cluster_inits=cluster_inits)
        self.num_experts, self.top_k = num_experts, top_k
        self.layers = None if layers is None else list(layers) if isinstance(layers, (list, tuple)) else [layers]
        self.gate, self.gate_noise, self.balance_loss = gate, None if gate_noise is None else float(gate_noise), bool(balance_loss)
        self.cluster_seed, self.cluster_inits = cluster_seed, cluster_inits
        self.router, self.batch_prioritized = router, bool(batch_prioritized)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.fp32_gate, self.expert_dropout, self.aux_loss = bool(fp32_gate), expert_dropout, aux_loss

    def resolve(self, model: nn.Module) -> tuple[int, int, list[str]]:
        """``(num_experts, top_k, FFN names)`` this surgery gives ``model`` (paper defaults filled in); checks
        every argument against the model (widths, ``top_k``, layer names) without touching a weight."""
        found = find_ffns(model)
        if not found:
            already = " (it is already converted)" if emoe_layers(model) else ""
            raise ValueError(f"Moefy: {type(model).__name__} has no FFN block that EMoE supports{already}. Supported: {SUPPORTED}")
        default_experts, default_k, default_layers = paper_defaults(found[0][1], len(found))
        num_experts = self.num_experts or default_experts
        top_k = self.top_k or (default_k if self.num_experts is None else max(1, num_experts // 4))
        targets = select_layers(found, default_layers if self.layers is None else self.layers)
        for name, family in targets:
            _check_args(num_experts, top_k, self.gate, "sparse", self.gate_noise or 0.0, ffn_width(model.get_submodule(name), family),
                        self.cluster_inits)
        return num_experts, top_k, [name for name, _ in targets]

    def transform(self, model: nn.Module) -> nn.Module:
        num_experts, top_k, names = self.resolve(model)
        return moefy(model, num_experts, top_k, layers=names or None, inplace=True, gate=self.gate, gate_noise=self.gate_noise,
                     balance_loss=self.balance_loss, seed=self.cluster_seed, cluster_inits=self.cluster_inits, router=self.router,
                     capacity_factor=self.capacity_factor, batch_prioritized=self.batch_prioritized, fp32_gate=self.fp32_gate,
                     expert_dropout=self.expert_dropout, aux_loss=self.aux_loss)

    def undo(self, model: nn.Module) -> nn.Module:
        """Every EMoE layer back to its dense block (original classes and neuron order, current weights): at
        ``top_k == num_experts`` the same function; below, the dense FFN of the finetuned experts."""
        return demoefy(model, inplace=True) if emoe_layers(model) else model
