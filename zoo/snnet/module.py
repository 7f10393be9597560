"""SNNetModule: trains a :class:`~zoo.snnet.StitchableNet`, one sampled stitch per step (a preset of ``zoo.Classifier``).

SN-Net (Pan et al., CVPR 2023) and SN-Netv2 (Pan et al., 2023). The anchors are timm ViT names with
kwargs, or checkpoints of zoo classifiers trained here (their heads are reused)::

    model:
      class_path: zoo.snnet.SNNetModule
      init_args:
        anchors:
          - checkpoints/snnet/anchor_w48.ckpt
          - {model: timm/vit_tiny_patch16_224, model_kwargs: {embed_dim: 96, depth: 12, num_heads: 3}}
        two_way: false          # SN-Netv2: large->small and chains too
        sampling: uniform       # or flops (SN-Netv2 resource-constrained, groups flops_gap GMACs wide)
        sample_per_rank: true   # official: each DDP rank trains its own stitch (seed + rank)
        init_batch_size: 100    # official least-squares init: 100 augmented training images,
        init_mode: train        # anchors in train mode (dropout / drop path on)
        lora_rank: 0            # SN-Netv2 low-rank stitching-layer updates
        fulltune: true          # false: train only stitching layers, cls tokens and heads
        teacher: null           # "largest" or a zoo .ckpt: distill into every stitch

The anchors are the module's backbone (:class:`~zoo.snnet.Anchors`) until ``configure_model`` applies the
:class:`~zoo.snnet.Stitch` surgery (built from ``kernel_size`` ... ``eval_stitch``): then the backbone, also
``module.net``, is the :class:`StitchableNet`, and ``unload_surgery()`` returns the selected stitch as a plain module.
The stitching layers are initialised by least squares when training starts (not after a resume), on
``init_batch_size`` images drawn afresh from the training loader (its augmentation applied), anchors in
``init_mode`` (official: 100 images, train mode), and broadcast from rank 0 under DDP. With ``sample_per_rank``
each DDP rank draws its own stitch each step (official: seed + rank), so N processes train N stitches per step;
otherwise every rank draws the same one. The draw count is saved in checkpoints and each rank's stream is
derived from (``sample_seed``, rank, draw count). Each step leaves the other stitches' parameters without gradient,
so DDP needs ``trainer.strategy: ddp_find_unused_parameters_true`` (checked before training). Validation runs the
selected stitch (``eval_stitch``, default the largest anchor); the :class:`~callbacks.stitch_sweep.StitchSweep`
callback evaluates all of them. Distillation is :class:`zoo.distillation.losses.HardDistill` (``distill_type: hard``,
the official default) or :class:`zoo.distillation.SoftTargetKL` (``soft``, ``soft_numel``) (``teacher: largest`` is a
frozen copy of the largest anchor), so ``losses`` can list any terms instead of ``teacher``/``distill_*``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import Strategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from zoo import losses as L
from zoo import sharding
from zoo.batch import Batch, as_batch
from zoo.classifier import Classifier
from zoo.distillation.losses import HardDistill, SoftTargetKL
from zoo.distillation.teachers import HeadedBackbone, pool_of
from zoo.snnet.net import StitchableNet
from zoo.snnet.sampler import StitchSampler
from zoo.snnet.surgery import Anchors, Stitch


def check_sharded_sampling(sample_per_rank: bool, strategy: Strategy, world_size: int) -> None:
    """Under sharding every rank must run the same blocks (FSDP gathers a block's shards on all ranks together), so
    each rank cannot train its own stitch: refuse ``sample_per_rank`` before training."""
    if sample_per_rank and world_size > 1 and sharding.is_sharding(strategy):
        raise ValueError(f"SNNetModule: sample_per_rank=true cannot train under {type(strategy).__name__} (each rank would run "
                         "a different stitch, but a sharded block is gathered by all ranks together); set "
                         "`model.init_args.sample_per_rank: false` (one stitch per step on every rank) or use DDP")


def check_find_unused(strategy: Strategy) -> None:
    """Fail unless a DDP-wrapped model looks for unused parameters (one stitch per step leaves most without gradient)."""
    if isinstance(strategy.model, DistributedDataParallel) and not strategy.model.find_unused_parameters:
        raise ValueError("SNNetModule trains one stitch per step, so each step leaves the other stitches' parameters without gradient and DDP must "
                         "look for them: set `trainer.strategy: ddp_find_unused_parameters_true` (or, with a DDPStrategy in YAML, its init arg "
                         "`find_unused_parameters: true`)")


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
        space: the stitch space (:class:`~zoo.snnet.Stitch`): ``v1`` windows, ``v2`` SN-Netv2's aligned positions, or
            ``None`` (v2 with ``two_way``, v1 without).
        nearest: stitch only neighbouring anchors (official ``nearest_stitching``); ``False``: every pair and small -> medium -> large.
        interpolate_depth: map anchors of different depth by interpolation (``False``: require equal depth).
        lora_rank: SN-Netv2 low-rank updates of the stitching layers (0: train them fully).
        lora_alpha: LoRA scaling numerator.
        sampling: ``uniform`` over stitches, or ``flops`` (resource-constrained, SN-Netv2).
        flops_gap: ``flops`` sampling: group width, in GMACs (official: 1.0) or a fraction of the largest stitch's MACs.
        flops_gap_unit: ``gmacs`` (official ``group_subnets_by_flops``) or ``fraction`` (scale-free, for small anchors).
        group_weights: ``flops`` sampling: ``uniform``, ``size`` or one weight per group.
        sample_seed: seed of the stitch sequence.
        sample_per_rank: each DDP rank draws its own stitch (stream ``sample_seed + rank``, official); ``False``: all
            ranks train the same stitch each step.
        init_batch_size: images of the least-squares init, drawn from a fresh pass of the training loader (official
            ``stitch_init_bs``: 100); ``None``: the first training batch itself.
        init_mode: ``train`` (official: dropout / drop path active while the features are taken) or ``eval``.
        fulltune: train all weights; ``False`` trains only the stitching layers, the anchors' ``cls_token`` (as the official
            code does) and the heads.
        eval_stitch: stitch used by validation/test/predict (default: the largest anchor).
        teacher: ``None``, ``largest`` (a frozen copy of the largest anchor) or a zoo ``.ckpt`` classifier: the losses
            become ``CrossEntropy(weight=1 - distill_alpha)`` + ``SoftTargetKL(weight=distill_alpha, teacher=teacher)``.
        distill_alpha: weight of the distillation term (cross-entropy gets ``1 - distill_alpha``).
        distill_temperature: softmax temperature of the distillation.
        distill_type: the distillation term: ``hard`` (default; ``HardDistill``: cross-entropy on the teacher's argmax,
            the official SN-Net DeiT recipe), ``soft`` (``SoftTargetKL``, KL averaged over the batch) or ``soft_numel``
            (``SoftTargetKL(reduction=numel)``: the official/DeiT ``sum / numel`` convention, ``classes`` times weaker).
        losses: the loss terms instead (default: cross-entropy, and the distillation above with a ``teacher``); a
            :mod:`zoo.distillation` term may name ``teacher: largest``.
        optimizer, lr_scheduler, scheduler_interval, label_smoothing: as :class:`~zoo.classifier.Classifier`.
    """

    DISTILL_TYPES = ("soft", "soft_numel", "hard")

    def __init__(
        self,
        anchors: list[str | dict[str, Any]],
        num_classes: int = 10,
        pretrained: bool = False,
        kernel_size: int = 2,
        stride: int = 1,
        two_way: bool = False,
        space: str | None = None,
        nearest: bool = True,
        interpolate_depth: bool = True,
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
        sampling: str = "uniform",
        flops_gap: float = 1.0,
        flops_gap_unit: str = "gmacs",
        group_weights: str | list[float] = "uniform",
        sample_seed: int = 0,
        sample_per_rank: bool = True,
        init_batch_size: int | None = 100,
        init_mode: str = "train",
        fulltune: bool = True,
        eval_stitch: int | None = None,
        teacher: str | None = None,
        distill_alpha: float = 0.5,
        distill_temperature: float = 1.0,
        distill_type: str = "hard",
        losses: list[L.LossTerm] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ):
        if sampling not in StitchSampler.MODES:
            raise ValueError(f"sampling={sampling!r}: expected one of {StitchSampler.MODES}")
        if flops_gap_unit not in StitchSampler.GAP_UNITS:
            raise ValueError(f"flops_gap_unit={flops_gap_unit!r}: expected one of {StitchSampler.GAP_UNITS}")
        if init_mode not in ("train", "eval"):
            raise ValueError(f"init_mode={init_mode!r}: expected 'train' (official) or 'eval'")
        if init_batch_size is not None and init_batch_size < 1:
            raise ValueError(f"init_batch_size={init_batch_size}: expected a positive number of images, or null (the first training batch)")
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha={distill_alpha}: expected a value in [0, 1]")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature={distill_temperature}: expected a positive value")
        if distill_type not in self.DISTILL_TYPES:
            raise ValueError(f"distill_type={distill_type!r}: expected one of {self.DISTILL_TYPES}")
        if teacher is not None and teacher != "largest" and not str(teacher).endswith(".ckpt"):
            raise ValueError(f"teacher={teacher!r}: expected null, 'largest' or a path to a zoo classifier .ckpt")
        if teacher is not None and losses is not None:
            raise ValueError("teacher= makes the losses (cross-entropy + zoo.distillation.SoftTargetKL); with `losses` given, "
                             "name the teacher on its distillation term instead (teacher: largest, or a .ckpt)")
        if not isinstance(anchors, (list, tuple)) or len(anchors) < 2:
            raise ValueError(f"anchors={anchors!r}: SN-Net needs a list of at least 2 anchors")
        terms = losses
        if teacher is not None:
            kd = (HardDistill(weight=distill_alpha, teacher=teacher) if distill_type == "hard" else
                  SoftTargetKL(weight=distill_alpha, temperature=distill_temperature, teacher=teacher,
                               reduction="numel" if distill_type == "soft_numel" else "batchmean"))
            terms = [L.CrossEntropy(weight=1 - distill_alpha, label_smoothing=label_smoothing), kd]
        stitch = Stitch(kernel_size=kernel_size, stride=stride, two_way=two_way, interpolate_depth=interpolate_depth, lora_rank=lora_rank,
                        lora_alpha=lora_alpha, eval_stitch=eval_stitch, space=space, nearest=nearest)
        super().__init__(model=None, num_classes=num_classes, pretrained=pretrained, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         scheduler_interval=scheduler_interval, label_smoothing=label_smoothing if teacher is None else 0.0, losses=terms,
                         surgery=[stitch])
        if teacher is not None:
            self.hparams["losses"] = None  # made from teacher / distill_* again when loaded
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.backbone = Anchors.build(anchors, num_classes, pretrained)  # stitched by the surgery in configure_model
        if not fulltune:
            self.backbone.backbones.requires_grad_(False)
            for anchor in self.backbone.backbones:  # official: the cls token trains with the stitching layers
                token = getattr(anchor, "cls_token", None)
                if isinstance(token, nn.Parameter):
                    token.requires_grad_(True)
        if any(getattr(t, "teacher", None) == "largest" for t in self.losses):  # before training: a frozen copy, outside the checkpoint
            i = self.backbone.largest()
            pool_of(self).add("largest", copy.deepcopy(HeadedBackbone(self.backbone.backbones[i], self.backbone.heads[i])), label="largest")
        self.sampler_args = (sampling, flops_gap, group_weights, sample_seed, flops_gap_unit)
        self.sample_per_rank, self.init_batch_size, self.init_mode = sample_per_rank, init_batch_size, init_mode
        self.sampler: StitchSampler | None = None  # made with the stitchable network (configure_model)
        self.last_stitch: int | None = None  # stitch of the latest training step

    # -- the stitchable network -----------------------------------------------------------
    def after_surgery(self) -> None:
        """The anchors are stitched (:class:`~zoo.snnet.Stitch`, first of ``surgery``): make the stitch sampler, once."""
        if self.sampler is None and isinstance(self.backbone, StitchableNet):
            sampling, flops_gap, group_weights, seed, unit = self.sampler_args
            self.sampler = StitchSampler(self.backbone.macs() if sampling == "flops" else [0] * len(self.backbone), sampling, flops_gap,
                                         group_weights, seed, unit)

    @property
    def net(self) -> StitchableNet:
        """The :class:`StitchableNet` (the backbone after ``configure_model``, which runs now if Lightning has not run it yet)."""
        if isinstance(self.backbone, Anchors) and not self.surgery_applied:
            self.configure_model()
        if not isinstance(self.backbone, StitchableNet):
            raise RuntimeError(f"{type(self).__name__}.net: the backbone is a {type(self.backbone).__name__}, not the StitchableNet "
                               "(unload_surgery() made it the plain selected stitch)")
        return self.backbone

    # -- what the StitchSweep callback uses ---------------------------------------------
    def select_stitch(self, stitch: int) -> None:
        """Make ``stitch`` the one validation, test, predict and ``forward`` run (kept in checkpoints)."""
        self.net.select(stitch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The selected stitch (after ``unload_surgery()``: the plain stitch network it returned)."""
        return (self.net if isinstance(self.backbone, Anchors) else self.backbone)(x)

    def no_weight_decay(self) -> set[str]:
        return {n for b in self.net.anchors if callable(getattr(b, "no_weight_decay", None)) for n in b.no_weight_decay()}

    # -- training -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_sharded_sampling(self.sample_per_rank, self.trainer.strategy, self.trainer.world_size)
        super().setup(stage)

    def on_fit_start(self) -> None:
        check_find_unused(self.trainer.strategy)  # the first hook after DDP wrapped the model, before any step

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.init_batch_size is not None and not bool(self.net.ls_initialized):  # a resume brings the solved layers
            self.init_stitching(self.init_images(self.init_batch_size))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not bool(self.net.ls_initialized):  # init_batch_size: null, the first training batch
            self.init_stitching(as_batch(batch).inputs)

    def init_images(self, n: int) -> torch.Tensor:
        """The first ``n`` images of a fresh pass over the training loader (its augmentation applied; fewer if it has fewer)."""
        loader, images, count = self.trainer.train_dataloader, [], 0
        if not isinstance(loader, Iterable) or isinstance(loader, (dict, list, tuple)):
            raise TypeError(f"SNNetModule(init_batch_size={n}) draws its least-squares images from one training DataLoader, got "
                            f"{type(loader).__name__}: set `init_batch_size: null` to use the first training batch instead")
        for batch in loader:
            images.append(as_batch(batch).ready().inputs)  # ready(): a datamodule with transform_on_device defers it
            count += len(images[-1])
            if count >= n:
                break
        return torch.cat(images)[:n].to(self.device)

    def init_stitching(self, images: torch.Tensor) -> None:
        """Least-squares init of the stitching layers on ``images`` (anchors in ``init_mode``), rank 0's solution on every rank.

        Sharded (FSDP2): solved with the stitchable net's own parameters gathered (its blocks gather theirs as they
        run), then rank 0's whole solution is written into every rank's shards."""
        if sharding.is_sharded(self.net):
            with sharding.unsharded(self.backbone):
                self.net.init_stitching_layers(images, train=self.init_mode == "train")
                solved = {n: p.detach().cpu().clone() for n, p in self.net.stitch_layers.named_parameters()}
            solved = self.trainer.strategy.broadcast(solved, src=0)
            for name, param in self.net.stitch_layers.named_parameters():
                sharding.copy_whole(param, solved[name])
            return
        self.net.init_stitching_layers(images, train=self.init_mode == "train")
        if self.trainer.world_size > 1:
            state = self.trainer.strategy.broadcast({k: v.cpu() for k, v in self.net.stitch_layers.state_dict().items()}, src=0)
            self.net.stitch_layers.load_state_dict(state)

    def batch_logits(self, batch: Batch) -> torch.Tensor:
        """Training: the stitch sampled for this step; evaluation: the selected stitch."""
        return self.net(batch.inputs, self.last_stitch if self.training else None)

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sampler is None:  # built without a Trainer: stitch now
            self.configure_model()
        self.last_stitch = self.sampler.sample(rank=self.global_rank if self.sample_per_rank else 0)
        out = super().training_loss(batch)
        self.log("train/stitch", float(self.last_stitch), on_step=True, on_epoch=False, batch_size=len(batch))
        return out

    # -- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.sharded:  # stitches not sampled yet have no optimizer state, which a sharded checkpoint needs
            sharding.fill_optimizer_states(checkpoint, self)
        checkpoint["snnet"] = {"sampler": self.sampler.state_dict(), "active": self.net.active}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        weights = checkpoint.get("state_dict", {})  # none in a sharded run's folder (the weights load from the shards)
        for key in [k for k in weights if k.startswith("teacher.")]:  # checkpoints of before zoo.snnet kept the teacher
            del weights[key]
        for key in [k for k in weights if k.startswith("net.")]:  # and the stitchable network at `net` (now the stitched backbone)
            weights["backbone." + key[4:]] = weights.pop(key)
        state = checkpoint.get("snnet")
        if state is not None:
            self.net.select(state["active"])
            if "flops_gap_unit" not in checkpoint.get("hyper_parameters", {"flops_gap_unit": None}) and self.sampler.mode == "flops":
                sampling, flops_gap, group_weights, seed, _ = self.sampler_args  # saved before issue 16: flops_gap was a fraction
                self.sampler = StitchSampler(self.net.macs(), sampling, flops_gap, group_weights, seed, "fraction")
            self.sampler.load_state_dict(state["sampler"])
