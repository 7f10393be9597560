"""Pruning callbacks that work on every zoo module.

* :class:`MagnitudePruning`: unstructured magnitude pruning (global or per layer) following a
  schedule (Zhu & Gupta 2017, "To prune, or not to prune"), on parameters chosen by name pattern.
* :class:`StructuredPruning`: channels, attention heads and FFN neurons by L2 norm (Torch-Pruning,
  Fang et al. 2023, "DepGraph"), masked during training and physically removed at the end of fit.
* :class:`LotteryTicket`: iterative magnitude pruning with weight rewinding to step ``k``
  (Frankle & Carbin 2019; Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis").

Masks live in the module as ``<name>_mask`` buffers of :mod:`torch.nn.utils.prune`. Checkpoints hold
plain weights (``weight = weight_orig * weight_mask``, so every checkpoint loads without the callback)
and the masks in the callback's state; a resumed run re-applies them before training continues. Under
DDP the masks are broadcast from rank 0, so they are identical on every rank.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatch
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.nn.utils import prune

from callbacks.pruning_schedules import Exponential, PruningSchedule


def _split(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``"a.b.weight"`` -> ``(module.a.b, "weight")``."""
    owner, _, pname = name.rpartition(".")
    return module.get_submodule(owner), pname


def _plain_names(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name without pruning's ``_orig`` suffix."""
    return {n.removesuffix("_orig"): p for n, p in module.named_parameters()}


def _batch_inputs(pl_module: LightningModule, batch: Any) -> Any:
    x = pl_module.unpack_batch(batch)[0] if hasattr(pl_module, "unpack_batch") else batch[0]
    if isinstance(x, dict):
        return {k: v[:1] for k, v in x.items()}
    return x[:1].detach()


class _MaskedPruning(Callback):
    """Shared machinery: follows a schedule, keeps masks in checkpoints, syncs them under DDP, draws figures."""

    def __init__(self, schedule: PruningSchedule, make_permanent: bool = True):
        if not isinstance(schedule, PruningSchedule):
            raise TypeError(f"schedule={schedule!r}: expected a callbacks.pruning_schedules.PruningSchedule")
        self.schedule = schedule
        self.make_permanent = make_permanent
        self.applied = 0.0  # target sparsity currently in force
        self.history: list[tuple[int, float, float]] = []  # (step, scheduled, measured) at each pruning step
        self._pending: dict[str, torch.Tensor] | None = None

    # -- to implement --------------------------------------------------------------------------
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

    @staticmethod
    def set_mask(pl_module: nn.Module, name: str, mask: torch.Tensor) -> None:
        """Multiply the mask of ``name`` by ``mask`` (re-parametrizing the parameter on first use)."""
        module, pname = _split(pl_module, name)
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
        for name, mask in self.masks(pl_module).items():
            module, pname = _split(pl_module, name)
            setattr(module, pname, getattr(module, pname + "_orig") * mask)

    def layer_sparsity(self, pl_module: nn.Module) -> dict[str, float]:
        return {n: 1.0 - m.sum().item() / m.numel() for n, m in self.masks(pl_module).items()}

    def remove_masks(self, pl_module: nn.Module) -> None:
        """Make pruning permanent: plain parameters with the zeros baked in, no hooks, no buffers."""
        for name in self.masks(pl_module):
            prune.remove(*_split(pl_module, name))

    @staticmethod
    def _sync(pl_module: nn.Module) -> None:
        """Broadcast every mask from rank 0 so that all ranks prune the same entries."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for module_mask in _MaskedPruning.masks(pl_module).values():
                dist.broadcast(module_mask, src=0)

    # -- schedule ------------------------------------------------------------------------------
    def _time(self, trainer: Trainer) -> int:
        return trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step

    def _apply_pending(self, pl_module: LightningModule) -> None:
        if self._pending:
            for name, mask in self._pending.items():
                self.set_mask(pl_module, name, mask)
        self._pending = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_pending(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply_pending(pl_module)
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

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_figures(trainer, pl_module)
        if self.make_permanent:
            self.remove_masks(pl_module)

    # -- checkpoints ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        module = getattr(self, "_module", None)
        masks = {n: m.detach().bool().cpu() for n, m in self.masks(module).items()} if module is not None else {}
        return {"applied": self.applied, "history": list(self.history), "masks": masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict["applied"]
        self.history = [tuple(h) for h in state_dict["history"]]
        self._pending = state_dict["masks"]

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Plain weights in the model state, so that every checkpoint loads without this callback.
        state = checkpoint["state_dict"]
        for name in self.masks(pl_module):
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


def select_parameters(pl_module: nn.Module, patterns: list[str], exclude: list[str] = (), include_frozen: bool = False) -> list[str]:
    """Names of the weight matrices / conv kernels (``ndim >= 2``) matching any of ``patterns`` (fnmatch).

    Frozen parameters (``requires_grad=False``) are left out unless ``include_frozen``. A pattern that
    matches no parameter raises a ``ValueError`` listing the closest candidates.
    """
    params = _plain_names(pl_module)
    for pattern in patterns:
        if not any(fnmatch(n, pattern) for n in params):
            close = difflib.get_close_matches(pattern, list(params), n=5, cutoff=0.3) or list(params)[:5]
            raise ValueError(f"pruning pattern {pattern!r} matches no parameter of {type(pl_module).__name__}; candidates: {', '.join(close)}")
    chosen = [n for n, p in params.items() if any(fnmatch(n, pat) for pat in patterns) and not any(fnmatch(n, ex) for ex in exclude) and p.ndim >= 2]
    trainable = [n for n in chosen if include_frozen or params[n].requires_grad]
    if not trainable:
        why = "all of them are frozen (set include_frozen=true to prune them)" if chosen else "none is a weight matrix or kernel (ndim >= 2) outside `exclude`"
        raise ValueError(f"pruning patterns {list(patterns)} select no parameter of {type(pl_module).__name__}: {why}")
    return trainable


class MagnitudePruning(_MaskedPruning):
    """Unstructured magnitude pruning following a schedule, built on ``torch.nn.utils.prune``.

    Every pruning step removes the smallest-magnitude surviving weights until the scheduled sparsity is
    reached: over all chosen parameters at once (``global_pruning``) or in each parameter separately.
    Pruned weights stay pruned. Only the chosen weight matrices/kernels are touched, and only trainable
    ones unless ``include_frozen`` (SubTuning's frozen layers and a distillation teacher stay dense).

    Args:
        schedule: a :mod:`callbacks.pruning_schedules` object (``OneShot``, ``Linear``, ``Exponential``, ``Cubic``).
        patterns: fnmatch patterns over parameter names, e.g. ``backbone.blocks.*.mlp.fc*``.
        exclude: patterns of parameters never pruned.
        global_pruning: one magnitude threshold over all chosen parameters (else the same sparsity per parameter).
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

    def __init__(self, schedule: PruningSchedule, patterns: list[str] = ("*.weight",), exclude: list[str] = (), global_pruning: bool = True, include_frozen: bool = False, make_permanent: bool = True):
        super().__init__(schedule, make_permanent)
        if isinstance(patterns, str) or not patterns:
            raise ValueError(f"patterns={patterns!r}: expected a non-empty list of fnmatch patterns")
        self.patterns, self.exclude = list(patterns), list(exclude)
        self.global_pruning = global_pruning
        self.include_frozen = include_frozen
        self.targets: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.targets = select_parameters(pl_module, self.patterns, self.exclude, self.include_frozen)

    def _pruned(self, pl_module: nn.Module) -> list[tuple[nn.Module, str, int, int]]:
        """``(module, name, numel, pruned so far)`` for every target."""
        out = []
        for name in self.targets:
            module, pname = _split(pl_module, name)
            mask = getattr(module, pname + "_mask", None)
            numel = getattr(module, pname).numel()
            out.append((module, pname, numel, 0 if mask is None else numel - int(mask.sum().item())))
        return out

    def compute_masks(self, pl_module: LightningModule, sparsity: float, batch: Any) -> None:
        self.refresh(pl_module)  # rank the current weights, not those of the last forward
        pruned = self._pruned(pl_module)
        if self.global_pruning:
            total, done = sum(p[2] for p in pruned), sum(p[3] for p in pruned)
            amount = round(sparsity * total) - done
            if amount > 0:
                prune.global_unstructured([(m, n) for m, n, _, _ in pruned], pruning_method=prune.L1Unstructured, amount=amount)
            return
        for module, pname, numel, done in pruned:
            amount = round(sparsity * numel) - done
            if amount > 0:
                prune.l1_unstructured(module, pname, amount=amount)

    def measure(self, pl_module: LightningModule) -> float:
        pruned = self._pruned(pl_module)
        return sum(p[3] for p in pruned) / sum(p[2] for p in pruned)


class LotteryTicket(MagnitudePruning):
    """Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    At step ``rewind_step`` (0: the initialization) the trainable weights are saved. Every
    ``round_steps`` steps, for ``rounds`` rounds, the smallest ``rate`` of the surviving chosen weights
    are pruned and all trainable weights are rewound to their saved values (optimizer state is reset),
    so round ``r`` trains the ticket of sparsity ``1 - (1 - rate)^r`` from step ``k``.

    YAML::

        trainer:
          max_steps: 400
          callbacks:
            - class_path: callbacks.pruning.LotteryTicket
              init_args: {rounds: 3, rate: 0.2, round_steps: 100, rewind_step: 10, patterns: ["backbone.*"]}
    """

    def __init__(self, rounds: int = 3, rate: float = 0.2, round_steps: int = 100, rewind_step: int = 0, patterns: list[str] = ("*.weight",), exclude: list[str] = (), global_pruning: bool = True, include_frozen: bool = False, make_permanent: bool = True):
        if rounds < 1:
            raise ValueError(f"LotteryTicket: rounds={rounds} must be >= 1")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"LotteryTicket: rate={rate} must be in (0, 1)")
        if not 0 <= rewind_step < round_steps:
            raise ValueError(f"LotteryTicket: rewind_step={rewind_step} must be in [0, round_steps={round_steps}) so the weights are saved before the first round prunes")
        schedule = Exponential(final_sparsity=1.0 - (1.0 - rate) ** rounds, initial_sparsity=rate, start=round_steps, end=rounds * round_steps, frequency=round_steps)
        super().__init__(schedule, patterns, exclude, global_pruning, include_frozen, make_permanent)
        self.rounds, self.rate, self.round_steps, self.rewind_step = rounds, rate, round_steps, rewind_step
        self.rewind_weights: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.rewind_weights is None and trainer.global_step >= self.rewind_step:
            self.rewind_weights = {n: p.detach().clone() for n, p in _plain_names(pl_module).items() if p.requires_grad}
        rounds_done = len(self.history)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if len(self.history) > rounds_done:
            self.rewind(pl_module)
            for optimizer in trainer.optimizers:
                optimizer.state.clear()

    @torch.no_grad()
    def rewind(self, pl_module: nn.Module) -> None:
        """Set every saved weight back to its step-``rewind_step`` value (pruned entries stay masked)."""
        params = _plain_names(pl_module)
        for name, value in self.rewind_weights.items():
            params[name].copy_(value)
        self.refresh(pl_module)  # the masked weights the hooks expose

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rewind_weights": self.rewind_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rewind_weights = state_dict["rewind_weights"]


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class StructuredPruning(_MaskedPruning):
    """Structured pruning of channels, attention heads and FFN neurons by L2 norm, with Torch-Pruning.

    At each pruning step Torch-Pruning's dependency graph (``tp.pruner.MetaPruner`` with
    ``tp.importance.MagnitudeImportance``) picks, in every group of coupled layers, the scheduled
    fraction of channels with the smallest norm; they are masked (``torch.nn.utils.prune`` masks on the
    producing rows, consuming columns and norm entries), so the network trains on without them. At the
    end of fit the masked channels are removed for real: the model shrinks and runs faster, with
    exactly the outputs of the masked model. timm attention loses whole heads (``num_heads`` is updated).

    Args:
        schedule: fraction of channels/heads/neurons removed per group (a pruning schedule).
        ignore: fnmatch patterns of module names whose output channels are kept (the classifier head,
            and e.g. ``backbone.patch_embed.proj`` to keep a ViT's embedding width). Frozen modules are
            always kept.
        prune_heads: remove whole attention heads of timm-style attention (modules with ``qkv`` and ``num_heads``).
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

    def __init__(self, schedule: PruningSchedule, ignore: list[str] = ("head",), prune_heads: bool = True, global_pruning: bool = False, round_to: int | None = None, make_permanent: bool = True):
        super().__init__(schedule, make_permanent)
        self.ignore = list(ignore)
        self.prune_heads = prune_heads
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.roots: set[str] = set()  # layers whose output channels are pruned
        self._example: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = [n for n, _ in pl_module.named_modules() if n]
        for pattern in self.ignore:
            if not any(fnmatch(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:5]
                raise ValueError(f"StructuredPruning: ignore pattern {pattern!r} matches no module of {type(pl_module).__name__}; candidates: {', '.join(close)}")

    def pruner(self, pl_module: nn.Module, sparsity: float, example: Any):
        """A Torch-Pruning ``MetaPruner`` that removes ``sparsity`` of every prunable group of ``pl_module``."""
        import torch_pruning as tp

        ignored = [m for n, m in pl_module.named_modules() if n and any(fnmatch(n, pat) for pat in self.ignore)]
        ignored += [m for m in pl_module.modules() if list(m.parameters(recurse=False)) and not any(p.requires_grad for p in m.parameters(recurse=False))]
        num_heads = {m.qkv: m.num_heads for m in pl_module.modules() if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")} if self.prune_heads else {}
        was_training = pl_module.training
        with torch.enable_grad():  # the dependency graph is traced with autograd
            pruner = tp.pruner.MetaPruner(
                pl_module, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=sparsity, ignored_layers=ignored,
                global_pruning=self.global_pruning, round_to=self.round_to, num_heads=num_heads, prune_num_heads=bool(num_heads),
                prune_head_dims=not num_heads, head_pruning_ratio=sparsity if num_heads else 0.0,
            )
        pl_module.train(was_training)
        return pruner

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._example is None:
            self._example = _batch_inputs(pl_module, batch)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def compute_masks(self, pl_module: LightningModule, sparsity: float, batch: Any) -> None:
        import torch_pruning as tp

        self.refresh(pl_module)  # rank the current weights, not those of the last forward
        names = {m: n for n, m in pl_module.named_modules()}
        masks: dict[str, torch.Tensor] = {}
        for group in self.pruner(pl_module, sparsity, self._example).step(interactive=True):
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
                        self.roots.add(names[module])
                elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
                    entries = [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
                else:
                    continue
                for pname, dim in entries:
                    key = f"{names[module]}.{pname}"
                    if key not in masks:
                        masks[key] = torch.ones_like(getattr(module, pname))
                    masks[key].index_fill_(dim, idx.to(masks[key].device), 0.0)
        for key, mask in masks.items():
            self.set_mask(pl_module, key, mask)

    def measure(self, pl_module: LightningModule) -> float:
        """Fraction of the output channels of the pruned layers that are masked."""
        masks = self.masks(pl_module)
        rows = [masks[f"{n}.weight"].flatten(1).amax(1) for n in sorted(self.roots) if f"{n}.weight" in masks]
        return sum(int((r == 0).sum()) for r in rows) / max(1, sum(r.numel() for r in rows))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "roots": sorted(self.roots)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.roots = set(state_dict["roots"])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_figures(trainer, pl_module)
        if self.make_permanent and self.history:
            self.remove_masks(pl_module)
            self.shrink(pl_module, self.applied, self._example)

    @torch.no_grad()
    def shrink(self, pl_module: nn.Module, sparsity: float, example: Any) -> None:
        """Physically remove the ``sparsity`` lowest-norm channels of every group (the masked ones)."""
        pruner = self.pruner(pl_module, sparsity, example)
        for group in pruner.step(interactive=True):
            group.prune()
        for m in pl_module.modules():
            if isinstance(getattr(m, "qkv", None), nn.Module) and m.qkv in pruner.num_heads:
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):
                    m.attn_dim = m.num_heads * m.head_dim
