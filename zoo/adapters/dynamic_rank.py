"""Dynamic-rank DoRA (Mao et al., "DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution",
ACL 2024; official code MIkumikumi0116/DoRA, ``Src/Finetune_And_Benchmark/Finetune_Utils.py``), and AdaLoRA through
``peft`` to compare with::

    model:
      class_path: zoo.Classifier
      init_args:
        surgery:
          - class_path: zoo.adapters.dynamic_rank.DynamicRank
            init_args: {rank: 8}                  # budget: 8 per matrix on average, starting from ceil(1.5 * 8) = 12
        losses:
          - class_path: zoo.losses.CrossEntropy
          - class_path: zoo.adapters.dynamic_rank.ComponentVariance
            init_args: {weight: 0.1}
    callbacks:
      rank_schedule: {class_path: callbacks.rank_schedule.RankSchedule}   # prunes the budget during training

Each adapted ``nn.Linear`` becomes a :class:`RankOneLinear`: ``W x + alpha / r0 * B diag(c) A x``, a sum of ``r0``
rank-one components ``b_i c_i a_i^T``, each with its own scalar ``c_i`` (official ``lora_scaler``, zero at start, so the
model starts as the plain one). The importance of a component is its share of the layer's update,
``||b_i c_i a_i^T||_F / ||B diag(c) A||_F``, smoothed by an EMA; :class:`~callbacks.rank_schedule.RankSchedule` zeroes
the scalars of the least important components of the whole model (one threshold for all layers), so the budget moves to
the matrices that need it. :meth:`DynamicRank.undo` merges every layer into a plain ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo import families
from zoo.adapters import checkpoint as ckpt
from zoo.adapters.targets import describe, select
from zoo.losses import LossTerm, Step
from zoo.surgery import Surgery

__all__ = ["AdaLoRA", "AdaLoraOrthogonality", "ComponentVariance", "DynamicRank", "RankOneLinear", "adalora_tuners", "rank_one_layers"]


OFFICIAL_PARTS = ["attention", "ffn"]  # every linear layer of attention and FFN (Build_Finetune_Config_List.py line 58)


def linear_targets(model: nn.Module, targets, parts, blocks, who: str) -> list[str]:
    """The ``nn.Linear`` layers chosen by :func:`zoo.adapters.targets.select` (all None: :data:`OFFICIAL_PARTS`)."""
    if targets is None and not parts and blocks is None:
        parts = OFFICIAL_PARTS
    names = select(model, targets, parts, blocks, who=who)
    root = families.root_of(model)
    other = [describe(n, root.get_submodule(n)) for n in names if type(root.get_submodule(n)) is not nn.Linear]
    if other:
        raise ValueError(f"{who}: adapts nn.Linear layers only; the selection has {', '.join(other[:4])}: choose layers "
                         "with `targets` / `parts` / `blocks`")
    return names


class RankOneLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``r0`` rank-one components with scalars (official ``Adaptive_Lora_Linear``).

    Init as the official code: ``A`` and ``B`` Kaiming-uniform, the scalars ``c`` zero; scaling ``alpha / r0``.
    Buffers (in checkpoints, so a resumed schedule continues): ``importance`` (EMA of the component scores),
    ``final_mask`` (components pruned for good) and ``mask_fixed`` (the schedule has ended).
    """

    def __init__(self, base: nn.Linear, initial_rank: int, target_rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.initial_rank, self.target_rank = initial_rank, target_rank
        self.scaling = alpha / initial_rank
        self.dropout = nn.Dropout(dropout)
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(initial_rank, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, initial_rank, device=dev, dtype=dtype))
        self.lora_scaler = nn.Parameter(torch.zeros(initial_rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A)  # as torch.nn.init in Finetune_Utils.py lines 343-344
        nn.init.kaiming_uniform_(self.lora_B)
        self.register_buffer("importance", torch.zeros(initial_rank, device=dev))
        self.register_buffer("final_mask", torch.zeros(initial_rank, dtype=torch.bool, device=dev))
        self.register_buffer("mask_fixed", torch.zeros((), dtype=torch.bool, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A) * self.lora_scaler, self.lora_B)
        return self.base(x) + update * self.scaling

    # -- public methods the schedule calls ------------------------------------------------------------------------
    @torch.no_grad()
    def component_scores(self, eps: float = 1e-8) -> torch.Tensor:
        """``||b_i c_i a_i^T||_F / (||B diag(c) A||_F + eps)`` per component (official ``update_importance_score``;
        the norm of a rank-one matrix is the product of its factors' norms)."""
        scaled_a = self.lora_A * self.lora_scaler.unsqueeze(1)
        total = (self.lora_B @ scaled_a).norm() + eps
        return (self.lora_B.norm(dim=0) * scaled_a.norm(dim=1) / total).float()

    @torch.no_grad()
    def update_importance(self, beta: float, eps: float = 1e-8) -> None:
        """EMA of :meth:`component_scores` with factor ``beta`` (official: 0.9)."""
        self.importance.mul_(beta).add_((1 - beta) * self.component_scores(eps))

    @torch.no_grad()
    def prune(self, threshold: float | torch.Tensor, final: bool = False) -> None:
        """Zero the scalars of the components whose importance is ``<= threshold``; ``final`` keeps that mask for good."""
        mask = self.importance <= threshold
        self.lora_scaler[mask] = 0
        if final:
            self.final_mask.copy_(mask)
            self.mask_fixed.fill_(True)

    @torch.no_grad()
    def enforce_mask(self) -> None:
        """After the schedule: zero again the scalars the optimizer moved (official: every step after pruning)."""
        if bool(self.mask_fixed):
            self.lora_scaler[self.final_mask] = 0

    @property
    def rank(self) -> int:
        """Components in use, as the official code counts them: nonzero scalars."""
        return int((self.lora_scaler != 0).sum())

    def component_variance(self) -> torch.Tensor:
        """Sum over components of the variance of ``a_i`` and of ``b_i`` (the official regulariser's numerator)."""
        return self.lora_A.var(dim=1).sum() + self.lora_B.var(dim=0).sum()

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_scaler.unsqueeze(1)) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out.requires_grad_(False)


def rank_one_layers(model: nn.Module) -> list[tuple[str, RankOneLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RankOneLinear)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class DynamicRank(Surgery):
    """Turn the target ``nn.Linear`` layers into :class:`RankOneLinear` (dynamic-rank DoRA).

    Args:
        rank: the final budget, as an average rank per matrix (official ``adaptive_lora_end_avg_rank`` = the searched
            ``lora_rank``, 8 in Build_Finetune_Config_List.py line 29); the whole model keeps ``rank x #matrices``
            components after the schedule.
        initial_rank: components per matrix at the start; None: ``ceil(1.5 * rank)`` (official, line 80).
        alpha: scaling numerator, scaling = ``alpha / initial_rank`` (official ``lora_alpha = 8``, line 76).
        dropout: on the adapter's input (official 0.1, line 77).
        targets, parts, blocks: which ``nn.Linear`` layers (:func:`zoo.adapters.targets.select`); all None: every
            linear layer of every block's attention and FFN (the official choice for RoBERTa / BART, line 58).
        checkpoint: ``trained`` (only the components, their buffers and the head; the base is rebuilt from the model's
            name, :mod:`zoo.adapters.checkpoint`) or ``full``.
    """

    def __init__(self, rank: int = 8, initial_rank: int | None = None, alpha: float = 8.0, dropout: float = 0.1,
                 targets: str | list[str] | None = None, parts: list[str] | None = None, blocks: list[int | str] | None = None,
                 checkpoint: str = "trained"):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"DynamicRank: rank={rank!r} must be an integer >= 1 (the final average rank per matrix)")
        start = math.ceil(1.5 * rank) if initial_rank is None else initial_rank
        if not isinstance(start, int) or start < rank:
            raise ValueError(f"DynamicRank: the budget rank={rank} per matrix is larger than initial_rank={initial_rank}: "
                             "pruning can only lower the rank; give initial_rank >= rank (default ceil(1.5 * rank))")
        if not 0 <= dropout < 1:
            raise ValueError(f"DynamicRank: dropout={dropout} must be in [0, 1)")
        self.rank, self.initial_rank, self.alpha, self.dropout = rank, initial_rank, float(alpha), float(dropout)
        self.targets = targets if targets is None or isinstance(targets, str) else list(targets)
        self.parts = None if parts is None else list(parts)
        self.blocks = None if blocks is None else list(blocks)
        self.checkpoint = ckpt.check_mode(checkpoint, "DynamicRank")
        self.handles: list = []

    def transform(self, model: nn.Module) -> nn.Module:
        root = families.root_of(model)
        names = linear_targets(model, self.targets, self.parts, self.blocks, "DynamicRank")
        start = math.ceil(1.5 * self.rank) if self.initial_rank is None else self.initial_rank
        for name in names:
            base = root.get_submodule(name)
            if start > min(base.in_features, base.out_features):
                raise ValueError(f"DynamicRank: initial_rank={start} is larger than the smaller dimension of {name} "
                                 f"({base.in_features} -> {base.out_features})")
        self.frozen = [n for n, p in model.named_parameters() if p.requires_grad]  # official: only the adapters train
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            _replace(root, name, RankOneLinear(root.get_submodule(name), start, self.rank, self.alpha, self.dropout))
        if self.checkpoint == "trained":
            self.handles = ckpt.keep_trained_only(model)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        """Merge every :class:`RankOneLinear` into a plain ``nn.Linear`` (``W + alpha / r0 * B diag(c) A``) and thaw
        what :meth:`transform` froze."""
        for name, layer in rank_one_layers(model):
            _replace(model, name, layer.merged())
        return ckpt.release_and_thaw(self, model)


class ComponentVariance(LossTerm):
    """The official regulariser (``Adaptive_Lora_Model_Wrapper.regularization_loss``): the mean over components of
    ``var(a_i) + var(b_i)``, summed over layers and divided by ``#layers * 2 * r0``; zero once the schedule has fixed the
    final mask. Official weight ``regularization_loss_alpha = 0.1`` (Build_Finetune_Config_List.py line 29)."""

    def __init__(self, weight: float = 0.1, name: str | None = None):
        super().__init__(weight=weight, name=name or "component_variance")

    def setup(self, module, stage: str) -> None:  # before configure_model: look at the surgery list
        if not rank_one_layers(module) and not any(isinstance(t, DynamicRank) for t in getattr(module, "surgery", [])):
            raise ValueError("ComponentVariance: the module has no RankOneLinear layer; add zoo.adapters.dynamic_rank.DynamicRank "
                             "to its `surgery`")

    def forward(self, step: Step) -> torch.Tensor:
        layers = [m for _, m in rank_one_layers(step.module)]
        if not layers:
            raise ValueError("ComponentVariance: the module has no RankOneLinear layer (add DynamicRank to its surgery)")
        if all(bool(m.mask_fixed) for m in layers):
            return step.logits.new_zeros((), dtype=torch.float32)  # float32 like the variance (bf16 logits under autocast)
        return sum(m.component_variance() for m in layers) / sum(2 * m.initial_rank for m in layers)


class AdaLoRA(Surgery):
    """AdaLoRA (Zhang et al., ICLR 2023) through ``peft``: peft's ``AdaLoraModel`` swaps the chosen layers for SVD-shaped
    updates ``P diag(lambda) Q`` in place (the backbone keeps its class; the tuner is :attr:`tuner`).
    :class:`~callbacks.rank_schedule.RankSchedule` sets its ``total_step`` / ``tinit`` / ``tfinal`` / ``deltaT`` from the
    same schedule as :class:`DynamicRank` and calls its ``update_and_allocate``. Defaults are peft's ``AdaLoraConfig``
    (init_r 12, target_r 8, beta1 = beta2 = 0.85; its orthogonality weight 0.5 is :class:`AdaLoraOrthogonality`'s, as
    peft adds the term only to a Hugging Face output's ``loss``). Targets as :class:`DynamicRank`. ``undo`` is peft's
    ``merge_and_unload``: a plain model."""

    def __init__(self, target_rank: int = 8, initial_rank: int = 12, alpha: float = 8.0, dropout: float = 0.0,
                 beta1: float = 0.85, beta2: float = 0.85, targets: str | list[str] | None = None, parts: list[str] | None = None,
                 blocks: list[int | str] | None = None, checkpoint: str = "trained"):
        if not (isinstance(target_rank, int) and isinstance(initial_rank, int)) or not 1 <= target_rank <= initial_rank:
            raise ValueError(f"AdaLoRA: target_rank={target_rank} must be an integer in [1, initial_rank={initial_rank}] "
                             "(the budget cannot exceed the initial rank total)")
        for k, v in (("beta1", beta1), ("beta2", beta2)):
            if not 0 < v < 1:
                raise ValueError(f"AdaLoRA: {k}={v} must be in (0, 1)")
        self.target_rank, self.initial_rank, self.alpha, self.dropout = target_rank, initial_rank, float(alpha), float(dropout)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.targets = targets if targets is None or isinstance(targets, str) else list(targets)
        self.parts = None if parts is None else list(parts)
        self.blocks = None if blocks is None else list(blocks)
        self.checkpoint = ckpt.check_mode(checkpoint, "AdaLoRA")
        self.tuner = None  # peft's AdaLoraModel around the root, while applied
        self.handles: list = []

    def transform(self, model: nn.Module) -> nn.Module:
        from peft import AdaLoraConfig
        from peft.tuners.adalora import AdaLoraModel

        names = linear_targets(model, self.targets, self.parts, self.blocks, "AdaLoRA")
        self.frozen = [n for n, p in model.named_parameters() if p.requires_grad]
        model.requires_grad_(False)
        # total_step / tinit / tfinal / deltaT are placeholders: RankSchedule sets them from the trainer before training
        config = AdaLoraConfig(init_r=self.initial_rank, target_r=self.target_rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               beta1=self.beta1, beta2=self.beta2, target_modules=names, total_step=1)
        self.tuner = AdaLoraModel(families.root_of(model), config, "default")  # swaps the layers in place
        if self.checkpoint == "trained":
            self.handles = ckpt.keep_trained_only(model)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        if self.tuner is not None:
            self.tuner.merge_and_unload()  # the root's layers are replaced in place
            self.tuner = None
        return ckpt.release_and_thaw(self, model)


def adalora_tuners(module: nn.Module) -> list:
    """The peft ``AdaLoraModel`` of every :class:`AdaLoRA` in ``module.surgery`` that is applied."""
    return [t.tuner for t in getattr(module, "surgery", []) if isinstance(t, AdaLoRA) and t.tuner is not None]


class AdaLoraOrthogonality(LossTerm):
    """peft's AdaLoRA orthogonality penalty (``AdaLoraModel.forward``): the mean over the ``lora_A`` / ``lora_B``
    matrices of ``||P^T P - I||_F`` (``A A^T`` for A, ``B^T B`` for B); peft's weight ``orth_reg_weight = 0.5``."""

    def __init__(self, weight: float = 0.5, name: str | None = None):
        super().__init__(weight=weight, name=name or "orthogonality")

    def forward(self, step: Step) -> torch.Tensor:
        terms = []
        for n, p in step.module.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and p.requires_grad:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
        if not terms:
            raise ValueError("AdaLoraOrthogonality: the module has no trainable lora_A / lora_B (add AdaLoRA to its surgery)")
        return torch.stack(terms).mean()
