"""``BalanceLoss``: the GShard load-balance term of EMoE layers, as a :class:`~zoo.losses.LossTerm`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zoo.emoe.convert import emoe_layers
from zoo.losses import LossTerm, Step

if TYPE_CHECKING:
    from zoo.classifier import Classifier


class BalanceLoss(LossTerm):
    """Sum (official) or mean over the EMoE layers of their auxiliary load-balance loss, computed by the layers in their forward when
    built with ``balance_loss`` (``zoo.emoe.Moefy(balance_loss=true)``); which loss is the layers' ``aux_loss``
    (official: tutel's load + importance loss; or GShard's, see :mod:`zoo.emoe.routing`). The official scripts add it
    with weight 0.01 (BERT / GPT-2 ``--aux_loss_weight 0.01``, ViT ``aux_loss_weights = 0.01``) summed over layers:
    ``reduction="sum"``, the default; ``"mean"`` (ours before) divides by the number of layers (the same with one layer).
    A module whose surgery does not ask for it fails in ``setup``. Float32 under mixed precision: the layers compute it
    from their float32 routing logits (``fp32_gate``, as tutel's gates, ``gates/cosine_top.py`` / ``gates/top.py``)."""

    def __init__(self, weight: float = 0.01, name: str | None = None, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"BalanceLoss: reduction={reduction!r}: expected 'sum' (official) or 'mean'")
        super().__init__(weight=weight, name=name or "balance_loss")
        self.reduction = reduction

    def setup(self, module: Classifier, stage: str) -> None:
        from zoo.emoe.surgery import Moefy

        backbone = getattr(module, "backbone", None)
        layers = emoe_layers(backbone) if backbone is not None else []
        planned = [s for s in getattr(module, "surgery", []) if isinstance(s, Moefy)]
        if stage == "fit" and not any(m.balance_loss for _, m in layers) and not any(s.balance_loss for s in planned):
            raise ValueError(f"loss term {self.name!r} (zoo.emoe.BalanceLoss) needs EMoE layers that compute the load-balance loss: "
                             "add zoo.emoe.Moefy with `balance_loss: true` to the module's surgery")

    def forward(self, step: Step) -> torch.Tensor:
        aux = [m.aux_loss for _, m in emoe_layers(step.module.backbone) if m.aux_loss is not None]
        if not aux:  # float32 zero, also when the logits are bf16 (autocast)
            return torch.zeros((), device=step.logits.device)
        return torch.stack(aux).sum() if self.reduction == "sum" else torch.stack(aux).mean()
