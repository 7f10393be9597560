"""The machinery shared by the pruning callbacks: a schedule, ``torch.nn.utils.prune`` masks, checkpoints, DDP, figures.

Masks live in the module as ``<name>_mask`` buffers of :mod:`torch.nn.utils.prune`. Checkpoints hold plain weights
(``weight = weight_orig * weight_mask``, so every checkpoint loads without the callback) and the masks in the
callback's state; a resumed run re-applies them before training continues. Under DDP the masks are broadcast from
rank 0, so they are identical on every rank.

Under sharding (FSDP2, ``zoo.sharding``) ``torch.nn.utils.prune`` cannot re-register a parameter that
``fully_shard`` manages, so the callback keeps the masks itself: whole boolean masks (identical on every rank),
computed from whole weights (``DTensor.full_tensor``, so per-layer and global thresholds are those of the whole
tensor); each rank zeroes the masked entries of its own shard when a mask changes and after every optimizer step.
A forward sees the same weights as with ``prune``'s ``weight_orig * weight_mask``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.nn.utils import prune

from callbacks.pruning import selection
from callbacks.pruning.selection import split_name
from callbacks.pruning_schedules import PruningSchedule
from zoo.sharding import is_sharded, like, reshard


class MaskedPruning(Callback):
    """Shared machinery: follows a schedule, keeps masks in checkpoints, syncs them under DDP, draws figures."""

    def __init__(self, schedule: PruningSchedule, make_permanent: bool = True):
        if not isinstance(schedule, PruningSchedule):
            raise TypeError(f"schedule={schedule!r}: expected a callbacks.pruning_schedules.PruningSchedule")
        self.schedule = schedule
        self.make_permanent = make_permanent
        self.applied = 0.0  # target sparsity currently in force
        self.history: list[tuple[int, float, float]] = []  # (step, scheduled, measured) at each pruning step
        self._pending: dict[str, torch.Tensor] | None = None
        self.reported = False
        self.untouched: dict[str, list[str]] = {}  # model -> roles of its family that the selection leaves unpruned
        self.sharded = False  # the module's parameters are DTensors (FSDP2): masks kept here, see the module docstring
        self.whole_masks: dict[str, torch.Tensor] = {}  # sharded mode: name -> whole bool mask

    def report(self, pl_module: LightningModule, names: list[str], include_frozen: bool = False) -> None:
        """Log what is pruned, by module type, and warn about attention / FFN roles left untouched (once per fit)."""
        if not self.reported:
            self.untouched = selection.report(type(self).__name__, pl_module, names, include_frozen)
            self.reported = True

    # -- to implement --------------------------------------------------------------------------
    def planned(self, pl_module: LightningModule, batch: Any) -> list[str]:
        """Names of the parameters this callback will mask (for the report at the start of training)."""
        raise NotImplementedError

    def compute_masks(self, pl_module: LightningModule, sparsity: float, batch: Any) -> None:
        """Prune ``pl_module`` (through ``torch.nn.utils.prune``) to ``sparsity``."""
        raise NotImplementedError

    def measure(self, pl_module: LightningModule) -> float:
        """The sparsity actually in force, in the unit the schedule speaks."""
        raise NotImplementedError

    # -- masks ---------------------------------------------------------------------------------
    @staticmethod
    def masks(pl_module: nn.Module) -> dict[str, torch.Tensor]:
        """Every pruning mask of the module, by parameter name."""
        return {f"{mn}.{bn[:-5]}".lstrip("."): b for mn, m in pl_module.named_modules() for bn, b in m.named_buffers(recurse=False) if bn.endswith("_mask") and hasattr(m, bn[:-5] + "_orig")}

    def current_masks(self, pl_module: nn.Module) -> dict[str, torch.Tensor]:
        """The masks in force: :meth:`masks` (``prune``'s buffers), or the whole masks kept here when sharded."""
        return self.whole_masks if self.sharded else self.masks(pl_module)

    def set_mask(self, pl_module: nn.Module, name: str, mask: torch.Tensor) -> None:
        """Multiply the mask of ``name`` by ``mask`` (re-parametrizing the parameter on first use)."""
        if self.sharded:
            mask = mask.detach().bool().cpu()
            self.whole_masks[name] = mask if name not in self.whole_masks else self.whole_masks[name] & mask
            self.apply_to_shards(pl_module, [name])
            return
        module, pname = split_name(pl_module, name)
        current = getattr(module, pname + "_mask", None)
        if current is None:
            prune.custom_from_mask(module, pname, mask.to(getattr(module, pname).device, getattr(module, pname).dtype))
        else:
            current.mul_(mask.to(current.device, current.dtype))
            setattr(module, pname, getattr(module, pname + "_orig") * current)

    def refresh(self, pl_module: nn.Module) -> None:
        """``weight = weight_orig * weight_mask`` for every masked parameter, as the forward pre-hook does.

        Between forwards the attribute still holds the last forward's value, one optimizer step stale;
        ranking by it would make the masks depend on when the last forward ran (a resumed run has none).
        """
        if self.sharded:
            self.apply_to_shards(pl_module)
            return
        for name, mask in self.masks(pl_module).items():
            module, pname = split_name(pl_module, name)
            setattr(module, pname, getattr(module, pname + "_orig") * mask)

    @torch.no_grad()
    def apply_to_shards(self, pl_module: nn.Module, names: list[str] | None = None) -> None:
        """Sharded mode: zero the masked entries of each rank's shard (its part of the whole mask)."""
        reshard(pl_module)  # parameters gathered after a validation forward would take the zeros only until resharded
        for name in self.whole_masks if names is None else names:
            module, pname = split_name(pl_module, name)
            param = getattr(module, pname)
            param.mul_(like(param, self.whole_masks[name].to(param.device, param.dtype)))

    def layer_sparsity(self, pl_module: nn.Module) -> dict[str, float]:
        return {n: 1.0 - m.sum().item() / m.numel() for n, m in self.current_masks(pl_module).items()}

    def remove_masks(self, pl_module: nn.Module) -> None:
        """Make pruning permanent: plain parameters with the zeros baked in, no hooks, no buffers."""
        if self.sharded:
            self.apply_to_shards(pl_module)
            self.whole_masks = {}
            return
        for name in self.masks(pl_module):
            prune.remove(*split_name(pl_module, name))

    def _sync(self, pl_module: nn.Module) -> None:
        """Broadcast every mask from rank 0 so that all ranks prune the same entries."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for module_mask in self.current_masks(pl_module).values():
                dist.broadcast(module_mask, src=0)
            if self.sharded:
                self.apply_to_shards(pl_module)

    # -- schedule ------------------------------------------------------------------------------
    def _time(self, trainer: Trainer) -> int:
        return trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step

    def _apply_pending(self, pl_module: LightningModule) -> None:
        if self._pending:
            for name, mask in self._pending.items():
                self.set_mask(pl_module, name, mask)
        self._pending = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.reported = False
        self.sharded = is_sharded(pl_module)
        self._apply_pending(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply_pending(pl_module)
        if not self.reported:
            self.report(pl_module, self.planned(pl_module, batch))
        t = self._time(trainer)
        target = self.schedule(t)
        if target <= self.applied + 1e-12:
            return
        with torch.no_grad():
            self.compute_masks(pl_module, target, batch)
            self._sync(pl_module)
        self.applied = target
        measured = self.measure(pl_module)
        self.history.append((t, target, measured))
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"pruning/scheduled": target, "pruning/measured": measured}, step=trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.sharded:  # the optimizer step moved the masked entries of the shards: zero them again
            self.apply_to_shards(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_figures(trainer, pl_module)
        if self.make_permanent:
            self.remove_masks(pl_module)

    # -- checkpoints ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        module = getattr(self, "_module", None)
        masks = {n: m.detach().bool().cpu() for n, m in self.current_masks(module).items()} if module is not None else {}
        return {"applied": self.applied, "history": list(self.history), "masks": masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict["applied"]
        self.history = [tuple(h) for h in state_dict["history"]]
        self._pending = state_dict["masks"]

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Plain weights in the model state, so that every checkpoint loads without this callback.
        state = checkpoint["state_dict"]
        for name in self.current_masks(pl_module):
            if name + "_orig" in state and name + "_mask" in state:
                state[name] = state.pop(name + "_orig") * state.pop(name + "_mask")

    # -- figures -------------------------------------------------------------------------------
    def _log_figures(self, trainer: Trainer, pl_module: LightningModule) -> None:
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if not trainer.is_global_zero or not hasattr(experiment, "add_figure") or not self.history:
            return
        from matplotlib.figure import Figure

        steps, scheduled, measured = zip(*self.history)
        horizon = max(max(steps), self.schedule.end, self._time(trainer))
        grid = list(range(0, horizon + 1, max(1, horizon // 500)))
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(grid, [self.schedule(t) for t in grid], label=f"scheduled ({type(self.schedule).__name__})")
        ax.scatter(steps, measured, color="C1", s=12, label="measured", zorder=3)
        ax.set(xlabel=self.schedule.interval, ylabel="sparsity", title=f"{type(self).__name__}: sparsity over training")
        ax.legend()
        experiment.add_figure("pruning/sparsity_schedule", fig, global_step=trainer.global_step)
        layers = self.layer_sparsity(pl_module)
        fig = Figure(figsize=(7, max(3, 0.22 * len(layers) + 1)))
        ax = fig.add_subplot()
        ax.barh(range(len(layers)), list(layers.values()))
        ax.set_yticks(range(len(layers)), list(layers), fontsize=6)
        ax.invert_yaxis()
        ax.set(xlabel="sparsity", xlim=(0, 1), title="final sparsity per parameter")
        fig.tight_layout()
        experiment.add_figure("pruning/final_layer_sparsity", fig, global_step=trainer.global_step)
