"""Structured pruning: channels, attention heads and FFN neurons by L2 norm (Torch-Pruning, Fang et al. 2023,
"DepGraph"), masked during training and physically removed at the end of fit. EMoE layers lose the same number
of neurons in every expert (the lowest-norm ones of each), so their stacked experts shrink too. The grouping,
ranking and removal are :mod:`zoo.pruning.structured`, shared with the one-shot surgery
:class:`zoo.pruning.PruneStructured`."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from callbacks.pruning.base import MaskedPruning
from callbacks.pruning_schedules import PruningSchedule
from zoo.batch import as_batch
from zoo.emoe.layers import EMoEFFN
from zoo.pruning.structured import EXPERT_TENSORS, expert_keep, expert_layers, is_ignored, meta_pruner, names_check, opaque_experts, remove_channels

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _batch_inputs(batch: Any) -> Any:
    x = as_batch(batch).inputs
    if isinstance(x, dict):
        return {k: v[:1] for k, v in x.items()}
    return x[:1].detach()


def _rows(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Per output channel (neuron, for an EMoE ``fc1_weight``), whether any of its entries survives."""
    return (mask.reshape(-1, mask.shape[-1]) if name.endswith("fc1_weight") else mask.flatten(1)).amax(1)


class StructuredPruning(MaskedPruning):
    """Structured pruning of channels, attention heads and FFN neurons by L2 norm, with Torch-Pruning.

    At each pruning step Torch-Pruning's dependency graph (``tp.pruner.MetaPruner`` with
    ``tp.importance.MagnitudeImportance``) picks, in every group of coupled layers, the scheduled
    fraction of channels with the smallest norm; they are masked (``torch.nn.utils.prune`` masks on the
    producing rows, consuming columns and norm entries), so the network trains on without them. At the
    end of fit the masked channels are removed for real: the model shrinks and runs faster, with
    exactly the outputs of the masked model. timm attention loses whole heads (``num_heads`` is updated).
    :class:`~zoo.emoe.EMoEFFN` layers (which Torch-Pruning cannot trace) lose the scheduled fraction of the
    neurons of every expert, the lowest-norm ones (their rows of ``fc1``/``up`` and ``fc2``).

    Args:
        schedule: fraction of channels/heads/neurons removed per group (a pruning schedule).
        ignore: fnmatch patterns of module names whose output channels are kept (the classifier head,
            and e.g. ``backbone.patch_embed.proj`` to keep a ViT's embedding width). Frozen modules are
            always kept.
        prune_heads: remove whole attention heads of timm-style attention (modules with ``qkv`` and ``num_heads``);
            false: every head loses the same share of its dimensions.
        global_pruning: rank channels across groups instead of the same fraction in each group.
        round_to: keep channel counts multiples of this (hardware-friendly).
        make_permanent: physically shrink the model at the end of fit (else keep the masks).

    YAML::

        trainer:
          callbacks:
            - class_path: callbacks.pruning.StructuredPruning
              init_args:
                ignore: [head]
                schedule:
                  class_path: callbacks.pruning_schedules.Linear
                  init_args: {final_sparsity: 0.5, start: 0, end: 2, frequency: 1, interval: epoch}
    """

    # zoo.sharding.check_strategy refuses a sharding strategy with this reason
    sharding = ("Torch-Pruning traces the whole model and resizes whole layers, which a sharded (DTensor) model cannot "
                "give it; prune once before training instead (zoo.pruning.PruneStructured surgery runs before sharding)")

    def __init__(self, schedule: PruningSchedule, ignore: list[str] = ("head",), prune_heads: bool = True, global_pruning: bool = False, round_to: int | None = None, make_permanent: bool = True):
        super().__init__(schedule, make_permanent)
        self.ignore = list(ignore)
        self.prune_heads = prune_heads
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.roots: set[str] = set()  # weights whose output channels (rows) are pruned
        self._example: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in setup: the module's surgery (configure_model) runs between the two
        names_check(pl_module, self.ignore, "StructuredPruning: ignore pattern")
        super().on_fit_start(trainer, pl_module)

    def _ignored(self, name: str, module: nn.Module) -> bool:
        return is_ignored(name, module, self.ignore)

    def experts(self, pl_module: nn.Module) -> list[tuple[str, EMoEFFN]]:
        """The EMoE layers this callback prunes (not ignored, not frozen)."""
        return expert_layers(pl_module, self.ignore)

    def pruner(self, pl_module: nn.Module, sparsity: float, example: Any, keep: list[nn.Module] = ()):
        """A Torch-Pruning ``MetaPruner`` that removes ``sparsity`` of every prunable group of ``pl_module``
        (``keep``: more modules to ignore). EMoE layers must be hidden first (:func:`opaque_experts`)."""
        ignored = [m for n, m in pl_module.named_modules() if n and self._ignored(n, m)] + list(keep)
        return meta_pruner(pl_module, sparsity, example, ignored, self.prune_heads, self.global_pruning, self.round_to)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._example is None:
            self._example = _batch_inputs(batch)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    expert_keep = staticmethod(expert_keep)

    @torch.no_grad()
    def plan(self, pl_module: nn.Module, sparsity: float, example: Any) -> tuple[dict[str, torch.Tensor], set[str]]:
        """``(masks by parameter name, weights whose rows are pruned)`` for ``sparsity``; nothing is changed."""
        import torch_pruning as tp

        self.refresh(pl_module)  # rank the current weights, not those of the last forward
        names = {m: n for n, m in pl_module.named_modules()}
        masks: dict[str, torch.Tensor] = {}
        roots: set[str] = set()
        with opaque_experts(pl_module) as proxies:
            groups = list(self.pruner(pl_module, sparsity, example, keep=proxies).step(interactive=True))
        for group in groups:
            for dep, idxs in group:
                module, out = dep.target.module, group._DG.is_out_channel_pruning_fn(dep.handler)
                idx = torch.as_tensor(tp._helpers.to_plain_idxs(idxs), dtype=torch.long)
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                    depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
                    if depthwise and module.groups != module.in_channels:
                        continue
                    dim = 0 if out or depthwise else 1
                    entries = [("weight", dim)] + ([("bias", 0)] if dim == 0 and module.bias is not None else [])
                    if out:
                        roots.add(f"{names[module]}.weight")
                elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
                    entries = [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
                else:
                    continue
                for pname, dim in entries:
                    key = f"{names[module]}.{pname}"
                    if key not in masks:
                        masks[key] = torch.ones_like(getattr(module, pname))
                    masks[key].index_fill_(dim, idx.to(masks[key].device), 0.0)
        for name, layer in self.experts(pl_module):
            keep = self.expert_keep(layer, sparsity)
            alive = torch.zeros(layer.fc1_weight.shape[:2], dtype=torch.bool, device=keep.device).scatter_(1, keep, True)
            for pname in EXPERT_TENSORS:
                tensor = getattr(layer, pname)
                if tensor is not None:
                    masks[f"{name}.{pname}"] = alive.reshape(*alive.shape, *[1] * (tensor.ndim - 2)).expand_as(tensor).to(tensor.dtype)
            roots.add(f"{name}.fc1_weight")
        return masks, roots

    def planned(self, pl_module: LightningModule, batch: Any) -> list[str]:
        return sorted(self.plan(pl_module, max(self.schedule.final_sparsity, 1e-6), _batch_inputs(batch))[0])

    def compute_masks(self, pl_module: LightningModule, sparsity: float, batch: Any) -> None:
        masks, roots = self.plan(pl_module, sparsity, self._example)
        self.roots |= roots
        for key, mask in masks.items():
            self.set_mask(pl_module, key, mask)

    def measure(self, pl_module: LightningModule) -> float:
        """Fraction of the output channels (and EMoE neurons) of the pruned layers that are masked."""
        masks = self.masks(pl_module)
        rows = [_rows(n, masks[n]) for n in sorted(self.roots) if n in masks]
        return sum(int((r == 0).sum()) for r in rows) / max(1, sum(r.numel() for r in rows))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "roots": sorted(self.roots)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # checkpoints before EMoE support named the modules, not their weights
        self.roots = {r if r.rpartition(".")[2].endswith("weight") else f"{r}.weight" for r in state_dict["roots"]}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_figures(trainer, pl_module)
        if self.make_permanent and self.history:
            self.remove_masks(pl_module)
            self.shrink(pl_module, self.applied, self._example)

    def shrink(self, pl_module: nn.Module, sparsity: float, example: Any) -> None:
        """Physically remove the ``sparsity`` lowest-norm channels of every group (the masked ones), and the
        ``sparsity`` lowest-norm neurons of every expert of the EMoE layers (:func:`zoo.pruning.remove_channels`)."""
        remove_channels(pl_module, sparsity, example, ignore=self.ignore, prune_heads=self.prune_heads,
                        global_pruning=self.global_pruning, round_to=self.round_to)
