"""SNNetModule: trains a :class:`~zoo.snnet.StitchableNet`, one sampled stitch per step.

SN-Net (Pan et al., CVPR 2023) and SN-Netv2 (Pan et al., 2023). The anchors are timm ViT names with
kwargs, or checkpoints of zoo classifiers trained here (their heads are reused)::

    model:
      class_path: zoo.snnet_module.SNNetModule
      init_args:
        anchors:
          - checkpoints/snnet/anchor_w48.ckpt
          - {model: timm/vit_tiny_patch16_224, model_kwargs: {embed_dim: 96, depth: 12, num_heads: 3}}
        two_way: false          # SN-Netv2: large->small and chains too
        sampling: uniform       # or flops (SN-Netv2 resource-constrained)
        lora_rank: 0            # SN-Netv2 low-rank stitching-layer updates
        fulltune: true          # false: train only stitching layers and heads
        teacher: null           # "largest" or a zoo .ckpt: distill into every stitch

The stitching layers are initialised by least squares on the first training batch (broadcast from
rank 0 under DDP). Every rank draws the same stitch each step, and the sampler's state is saved in
checkpoints. Validation runs the selected stitch (``eval_stitch``, default the largest anchor); the
:class:`~callbacks.stitch_sweep.StitchSweep` callback evaluates all of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from zoo.backbones import build_backbone, load_zoo_module
from zoo.classifier import Classifier
from zoo.snnet import StitchableNet, StitchSampler

ANCHOR_KEYS = ("model", "pretrained", "model_kwargs")


def build_anchor(spec: str | dict[str, Any], num_classes: int, pretrained: bool) -> tuple[nn.Module, nn.Module, str]:
    """``(backbone, head, name)`` of one anchor: a zoo ``.ckpt`` (its head kept when it has ``num_classes``
    outputs), a model name, or ``{model, pretrained, model_kwargs}``."""
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict) or "model" not in spec or set(spec) - set(ANCHOR_KEYS):
        raise ValueError(f"anchor {spec!r}: expected a model name, a zoo .ckpt path, or a dict with keys {ANCHOR_KEYS} ('model' required)")
    name = spec["model"]
    if name.endswith(".ckpt"):
        module = load_zoo_module(name)
        backbone, head = getattr(module, "backbone", None), getattr(module, "head", None)
        if backbone is None or head is None:
            raise ValueError(f"anchor {name!r}: {type(module).__name__} has no backbone and head to stitch")
        if not isinstance(head, nn.Linear) or head.out_features != num_classes:
            head = nn.Linear(backbone.num_features, num_classes)
        return backbone, head, Path(name).stem
    backbone = build_backbone(name, spec.get("pretrained", pretrained), **(spec.get("model_kwargs") or {}))
    return backbone, nn.Linear(backbone.num_features, num_classes), name.rsplit("/", 1)[-1]


class SNNetModule(Classifier):
    """Stitchable network training (SN-Net / SN-Netv2) as a zoo classifier.

    Args:
        anchors: the model family: model names, zoo ``.ckpt`` paths or ``{model, pretrained, model_kwargs}``,
            in any order (sorted by size).
        num_classes: classes (linked from the datamodule by the CLI).
        pretrained: default ``pretrained`` of anchors given by name.
        kernel_size: sliding-window size over block ids (SN-Net: 2).
        stride: sliding-window stride (SN-Net: 1).
        two_way: SN-Netv2 two-way stitching (large->small, small->large->small, large->small->large).
        interpolate_depth: map anchors of different depth by interpolation (``False``: require equal depth).
        lora_rank: SN-Netv2 low-rank updates of the stitching layers (0: train them fully).
        lora_alpha: LoRA scaling numerator.
        sampling: ``uniform`` over stitches, or ``flops`` (resource-constrained, SN-Netv2).
        flops_gap: ``flops`` sampling: group width as a fraction of the largest stitch's FLOPs.
        group_weights: ``flops`` sampling: ``uniform``, ``size`` or one weight per group.
        sample_seed: seed of the stitch sequence (same on every rank).
        fulltune: train all weights; ``False`` trains only stitching layers and heads.
        eval_stitch: stitch used by validation/test/predict (default: the largest anchor).
        teacher: ``None``, ``largest`` (a frozen copy of the largest anchor) or a zoo ``.ckpt`` classifier.
        distill_alpha: weight of the distillation term (cross-entropy gets ``1 - distill_alpha``).
        distill_temperature: softmax temperature of the distillation.
    """

    def __init__(
        self,
        anchors: list[str | dict[str, Any]],
        num_classes: int = 10,
        pretrained: bool = False,
        kernel_size: int = 2,
        stride: int = 1,
        two_way: bool = False,
        interpolate_depth: bool = True,
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
        sampling: str = "uniform",
        flops_gap: float = 0.05,
        group_weights: str | list[float] = "uniform",
        sample_seed: int = 0,
        fulltune: bool = True,
        eval_stitch: int | None = None,
        teacher: str | None = None,
        distill_alpha: float = 0.5,
        distill_temperature: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ):
        if sampling not in StitchSampler.MODES:
            raise ValueError(f"sampling={sampling!r}: expected one of {StitchSampler.MODES}")
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha={distill_alpha}: expected a value in [0, 1]")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature={distill_temperature}: expected a positive value")
        if teacher is not None and teacher != "largest" and not str(teacher).endswith(".ckpt"):
            raise ValueError(f"teacher={teacher!r}: expected null, 'largest' or a path to a zoo classifier .ckpt")
        if not isinstance(anchors, (list, tuple)) or len(anchors) < 2:
            raise ValueError(f"anchors={anchors!r}: SN-Net needs a list of at least 2 anchors")
        super().__init__(model=None, num_classes=num_classes, pretrained=pretrained, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         scheduler_interval=scheduler_interval, label_smoothing=label_smoothing)
        built = [build_anchor(spec, num_classes, pretrained) for spec in anchors]
        self.net = StitchableNet([b for b, _, _ in built], [h for _, h, _ in built], [n for _, _, n in built], kernel_size=kernel_size,
                                 stride=stride, two_way=two_way, interpolate_depth=interpolate_depth, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.net.select(self.net.anchor_ids[-1] if eval_stitch is None else eval_stitch)
        self.sampler = StitchSampler(self.net.flops() if sampling == "flops" else [0] * len(self.net), sampling, flops_gap, group_weights, sample_seed)
        if not fulltune:
            self.net.anchors.requires_grad_(False)
        self.teacher = self._build_teacher(teacher)
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature
        self.last_stitch: int | None = None  # stitch of the latest training step

    def _build_teacher(self, teacher: str | None) -> nn.Module | None:
        if teacher is None:
            return None
        if teacher == "largest":
            model = copy.deepcopy(nn.Sequential(self.net.anchors[-1], self.net.heads[-1]))
        else:
            model = load_zoo_module(teacher)
        return model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> SNNetModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def no_weight_decay(self) -> set[str]:
        return {n for b in self.net.anchors if callable(getattr(b, "no_weight_decay", None)) for n in b.no_weight_decay()}

    # -- training -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Each step uses one stitch, so most parameters get no gradient: DDP must look for them. A DDPStrategy given
        # by class_path in YAML passes find_unused_parameters=False explicitly (jsonargparse fills DDP's defaults in).
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
            rank_zero_info("SNNetModule: setting DDP find_unused_parameters=True (one stitch per step leaves other parameters unused)")
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if bool(self.net.ls_initialized):
            return
        self.net.init_stitching_layers(self.unpack_batch(batch)[0])
        if self.trainer.world_size > 1:  # every rank takes rank 0's solution
            state = self.trainer.strategy.broadcast({k: v.cpu() for k, v in self.net.stitch_layers.state_dict().items()}, src=0)
            self.net.stitch_layers.load_state_dict(state)

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.unpack_batch(batch)
        stitch = self.sampler.sample()
        self.last_stitch = stitch
        logits = self.net(x, stitch)
        loss = self.criterion(logits, y)
        if self.teacher is not None:
            t = self.distill_temperature
            with torch.no_grad():
                target = F.log_softmax(self.teacher(x) / t, -1)
            kd = F.kl_div(F.log_softmax(logits / t, -1), target, log_target=True, reduction="batchmean") * t * t
            loss = (1 - self.distill_alpha) * loss + self.distill_alpha * kd
            self.log("train/distill", kd, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/stitch", float(stitch), on_step=True, on_epoch=False, batch_size=len(y))
        return loss, logits, y

    # -- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["snnet"] = {"sampler": self.sampler.state_dict(), "active": self.net.active}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("snnet")
        if state is not None:
            self.sampler.load_state_dict(state["sampler"])
            self.net.select(state["active"])
