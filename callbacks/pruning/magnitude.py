"""Unstructured magnitude pruning: :class:`MagnitudePruning` (Zhu & Gupta 2017, "To prune, or not to prune") and
:class:`LotteryTicket` (iterative magnitude pruning with rewinding; Frankle & Carbin 2019; Frankle et al. 2020)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from callbacks.pruning.base import MaskedPruning
from callbacks.pruning.selection import plain_names, select_parameters, split_name
from callbacks.pruning_schedules import Exponential, PruningSchedule
from zoo.sharding import copy_whole, whole


class MagnitudePruning(MaskedPruning):
    """Unstructured magnitude pruning following a schedule, built on ``torch.nn.utils.prune``.

    Every pruning step removes the smallest-magnitude surviving weights until the scheduled sparsity is
    reached: in each parameter separately (default: Zhu & Gupta prune every layer to ``s_t``, as the official
    ``tensorflow/contrib/model_pruning`` does with a threshold per weight tensor), or over all chosen parameters
    at once (``global_pruning: true``, one threshold; layers end at different sparsities). Pruned weights stay pruned. Only the chosen weight matrices/kernels are touched, and only trainable
    ones unless ``include_frozen`` (SubTuning's frozen layers and a distillation teacher stay dense).
    The parameters are chosen at the start of fit (after the module's surgery, e.g. EMoE experts, is applied);
    a table of them by module type is logged, and a selection that leaves every attention or every FFN module
    of a known model family unpruned is warned about.

    Args:
        schedule: a :mod:`callbacks.pruning_schedules` object (``OneShot``, ``Linear``, ``Exponential``, ``Cubic``).
        patterns: fnmatch patterns over parameter names, e.g. ``backbone.blocks.*.mlp.fc*``; None (default): every
            weight tensor named ``weight`` and the weights a module lists in ``pruning_weights`` (EMoE's experts).
        exclude: patterns of parameters never pruned.
        global_pruning: one magnitude threshold over all chosen parameters; False (default, Zhu & Gupta 2017): every
            parameter is pruned to the scheduled sparsity, ``round(s_t * numel)`` zeros each, as
            ``torch.nn.utils.prune.l1_unstructured`` per parameter.
        include_frozen: also prune parameters with ``requires_grad=False``.
        make_permanent: at the end of fit, bake the zeros in and drop the masks (a plain model).

    YAML::

        trainer:
          callbacks:
            - class_path: callbacks.pruning.MagnitudePruning
              init_args:
                patterns: ["backbone.blocks.*"]
                schedule:
                  class_path: callbacks.pruning_schedules.Cubic
                  init_args: {final_sparsity: 0.8, start: 0, end: 1000, frequency: 50}
    """

    def __init__(self, schedule: PruningSchedule, patterns: list[str] | None = None, exclude: list[str] = (), global_pruning: bool = False, include_frozen: bool = False, make_permanent: bool = True):
        super().__init__(schedule, make_permanent)
        if patterns is not None and (isinstance(patterns, str) or not patterns):
            raise ValueError(f"patterns={patterns!r}: expected a non-empty list of fnmatch patterns (or null: every weight tensor)")
        self.patterns, self.exclude = None if patterns is None else list(patterns), list(exclude)
        self.global_pruning = global_pruning
        self.include_frozen = include_frozen
        self.targets: list[str] = []

    def select(self, pl_module: nn.Module) -> list[str]:
        """Choose the parameters to prune (``targets``) in the module as it is now; fails on a bad pattern."""
        self.targets = select_parameters(pl_module, self.patterns, self.exclude, self.include_frozen)
        self._owners = (pl_module, [split_name(pl_module, n) for n in self.targets])  # looked up once, not every pruning step
        return self.targets

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here, not in setup: the module's surgery (configure_model) runs between the two
        self.select(pl_module)
        super().on_fit_start(trainer, pl_module)
        self.report(pl_module, self.targets, self.include_frozen)

    def planned(self, pl_module: LightningModule, batch: Any) -> list[str]:
        return self.targets

    def _pruned(self, pl_module: nn.Module) -> list[tuple[nn.Module, str, int, int]]:
        """``(module, name, numel, pruned so far)`` for every target."""
        out = []
        cached = getattr(self, "_owners", (None, []))
        owners = cached[1] if cached[0] is pl_module and len(cached[1]) == len(self.targets) else [split_name(pl_module, n) for n in self.targets]
        for name, (module, pname) in zip(self.targets, owners):
            mask = self.whole_masks.get(name) if self.sharded else getattr(module, pname + "_mask", None)
            numel = getattr(module, pname).numel()
            out.append((module, pname, numel, 0 if mask is None else numel - int(mask.sum().item())))
        return out

    def compute_masks(self, pl_module: LightningModule, sparsity: float, batch: Any) -> None:
        """Mask the smallest-magnitude surviving weights, over all targets (``global_pruning``) or per target, until
        ``sparsity`` is reached. The masks are updated in place: ``torch.nn.utils.prune``'s own ``global_unstructured``
        would wrap every parameter in a new ``PruningContainer`` at each pruning step (a growing chain, ~5x the time)."""
        self.refresh(pl_module)  # rank the current weights, not those of the last forward
        pruned = list(zip(self.targets, self._pruned(pl_module)))
        for group in [pruned] if self.global_pruning else [[p] for p in pruned]:
            amount = round(sparsity * sum(p[2] for _, p in group)) - sum(p[3] for _, p in group)
            if amount <= 0:
                continue
            weights = [whole(getattr(m, n).detach()) for _, (m, n, _, _) in group]  # whole tensors when sharded
            masks = [self.whole_masks.get(name) if self.sharded else getattr(m, n + "_mask", None) for name, (m, n, _, _) in group]
            scores = torch.cat([w.abs().flatten() for w in weights])
            keep = torch.cat([(torch.ones_like(w) if k is None else k).flatten() for w, k in zip(weights, masks)]).bool()
            scores[~keep] = float("inf")  # pruned weights stay pruned and are not counted again
            keep[scores.topk(amount, largest=False).indices] = False
            for (name, _), chunk, w in zip(group, keep.split([w.numel() for w in weights]), weights):
                self.set_mask(pl_module, name, chunk.view_as(w))

    def measure(self, pl_module: LightningModule) -> float:
        pruned = self._pruned(pl_module)
        return sum(p[3] for p in pruned) / sum(p[2] for p in pruned)


class LotteryTicket(MagnitudePruning):
    """Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    At step ``rewind_step`` (0: the initialization) the trainable weights are saved. Every
    ``round_steps`` steps, for ``rounds`` rounds, the smallest ``rate`` of the surviving chosen weights
    are pruned and all trainable weights are rewound to their saved values (optimizer state is reset),
    so round ``r`` trains the ticket of sparsity ``1 - (1 - rate)^r`` from step ``k``.

    ``rewind_lr`` (default True, as in Frankle et al. 2020, where rewinding to iteration ``k`` also resets the
    learning-rate schedule to step ``k``): the LR schedulers' states and the optimizers' param-group
    hyperparameters (``lr``, momentum, ...) are saved with the weights and restored at every round.
    False keeps the schedule running on (the weights alone are rewound).

    YAML::

        trainer:
          max_steps: 400
          callbacks:
            - class_path: callbacks.pruning.LotteryTicket
              init_args: {rounds: 3, rate: 0.2, round_steps: 100, rewind_step: 10, patterns: ["backbone.*"]}
    """

    def __init__(self, rounds: int = 3, rate: float = 0.2, round_steps: int = 100, rewind_step: int = 0, patterns: list[str] | None = None, exclude: list[str] = (), global_pruning: bool = True, include_frozen: bool = False, make_permanent: bool = True, rewind_lr: bool = True):
        if rounds < 1:
            raise ValueError(f"LotteryTicket: rounds={rounds} must be >= 1")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"LotteryTicket: rate={rate} must be in (0, 1)")
        if not 0 <= rewind_step < round_steps:
            raise ValueError(f"LotteryTicket: rewind_step={rewind_step} must be in [0, round_steps={round_steps}) so the weights are saved before the first round prunes")
        schedule = Exponential(final_sparsity=1.0 - (1.0 - rate) ** rounds, initial_sparsity=rate, start=round_steps, end=rounds * round_steps, frequency=round_steps)
        super().__init__(schedule, patterns, exclude, global_pruning, include_frozen, make_permanent)
        self.rounds, self.rate, self.round_steps, self.rewind_step = rounds, rate, round_steps, rewind_step
        self.rewind_lr = rewind_lr
        self.rewind_weights: dict[str, torch.Tensor] | None = None
        self.rewind_schedule: dict[str, list] | None = None  # scheduler state_dicts and param-group hyperparameters at step k

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.rewind_weights is None and trainer.global_step >= self.rewind_step:  # whole tensors when sharded
            self.rewind_weights = {n: whole(p.detach()).clone() for n, p in plain_names(pl_module).items() if p.requires_grad}
            if self.rewind_lr:
                self.rewind_schedule = self.schedule_state(trainer)
        rounds_done = len(self.history)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if len(self.history) > rounds_done:
            self.rewind(pl_module)
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
            if self.rewind_lr and self.rewind_schedule is not None:
                self.restore_schedule(trainer, self.rewind_schedule)

    @staticmethod
    def schedule_state(trainer: Trainer) -> dict[str, list]:
        """The LR schedulers' state_dicts and the optimizers' param-group hyperparameters (all but ``params``)."""
        return {"schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
                "param_groups": [[copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in o.param_groups] for o in trainer.optimizers]}

    @staticmethod
    def restore_schedule(trainer: Trainer, state: dict[str, list]) -> None:
        """Put the schedulers and the optimizers' ``lr`` (etc.) back as :meth:`schedule_state` saved them."""
        if len(state["schedulers"]) != len(trainer.lr_scheduler_configs) or len(state["param_groups"]) != len(trainer.optimizers):
            raise RuntimeError("LotteryTicket: the optimizers/LR schedulers differ from those saved at rewind_step; set rewind_lr: false")
        for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
            config.scheduler.load_state_dict(copy.deepcopy(saved))
        for optimizer, groups in zip(trainer.optimizers, state["param_groups"]):
            for group, saved in zip(optimizer.param_groups, groups):
                group.update(copy.deepcopy(saved))

    @torch.no_grad()
    def rewind(self, pl_module: nn.Module) -> None:
        """Set every saved weight back to its step-``rewind_step`` value (pruned entries stay masked)."""
        params = plain_names(pl_module)
        for name, value in self.rewind_weights.items():
            copy_whole(params[name], value)  # this rank's part of the whole saved tensor when sharded
        self.refresh(pl_module)  # the masked weights the hooks expose

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rewind_weights": self.rewind_weights, "rewind_schedule": self.rewind_schedule}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rewind_weights = state_dict["rewind_weights"]
        self.rewind_schedule = state_dict.get("rewind_schedule")  # absent in checkpoints older than rewind_lr
