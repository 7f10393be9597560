"""RankSchedule: move a LoRA budget to the matrices that need it during training (dynamic-rank DoRA, or AdaLoRA).

With :class:`zoo.adapters.dynamic_rank.DynamicRank` layers, the official DoRA schedule (MIkumikumi0116/DoRA,
``Finetune_Utils.py``, ``Adaptive_Lora_Model_Wrapper.prune_lora_scaler``): after every optimizer step ``t`` of ``T``,

* ``p = int(t - T * start_ratio)``, ``P = int(T * (1 - start_ratio - end_ratio))``;
* while ``p <= P``: every layer updates its importance EMA; when ``p >= 0`` and (``p % interval == 0`` or ``p == P``)
  the components whose importance is at most the ``k``-th smallest of the whole model are zeroed,
  ``k = max(1, int(N * (r0 - r) / r0 * (p / P) ** 3))`` of the ``N`` components (cubic schedule);
* at ``p == P`` the mask is final (``N - int(N (r0 - r) / r0)`` components stay, ``r`` per matrix on average); after
  it, the pruned scalars are zeroed again after every step and :class:`~zoo.adapters.dynamic_rank.ComponentVariance`
  is off.

With peft's AdaLoRA (:class:`zoo.adapters.dynamic_rank.AdaLoRA`), the same ``T``, ``start_ratio``, ``end_ratio`` and
``interval`` become its ``total_step``, ``tinit``, ``tfinal`` and ``deltaT``, and its ``update_and_allocate(t)`` is
called after every optimizer step (gradients are still there: Lightning zeroes them before the next backward).
Its allocator's importance statistics and final rank pattern live outside the module's state dict: they are this
callback's checkpointed state, so a run resumed mid-schedule continues exactly (DoRA's live in the layers' buffers).

    callbacks:
      rank_schedule: {class_path: callbacks.rank_schedule.RankSchedule, init_args: {interval: 100}}
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RankSchedule(Callback):
    """Prune rank-one components by importance on the official schedule (or drive peft's AdaLoRA allocator).

    Args:
        start_ratio: share of training before pruning starts (official ``adaptive_lora_start_prune_step_ratio`` 0.15,
            Build_Finetune_Config_List.py line 82).
        end_ratio: share of training after the final mask (official ``adaptive_lora_end_prune_step_ratio`` 0.5, line 83).
        interval: optimizer steps between two prunings (official ``prune_interval`` 100, line 29).
        beta: EMA factor of the importance (official ``adaptive_lora_sensitivity_beta`` 0.9, line 85).
        eps: added to the layer norm in the importance (official ``adaptive_lora_eps`` 1e-8, line 86).
        total_steps: ``T``; None: the trainer's ``estimated_stepping_batches``. It may not exceed training.
    """

    sharding = "the importance and the pruning read and write whole adapter matrices (not tested on DTensor shards)"

    def __init__(self, start_ratio: float = 0.15, end_ratio: float = 0.5, interval: int = 100, beta: float = 0.9,
                 eps: float = 1e-8, total_steps: int | None = None):
        if not (0 <= start_ratio < 1 and 0 <= end_ratio < 1 and start_ratio + end_ratio < 1):
            raise ValueError(f"RankSchedule: start_ratio={start_ratio} and end_ratio={end_ratio} must be in [0, 1) with a sum "
                             "below 1 (pruning happens between them)")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"RankSchedule: interval={interval!r} must be an integer >= 1")
        if not 0 <= beta < 1:
            raise ValueError(f"RankSchedule: beta={beta} must be in [0, 1)")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"RankSchedule: total_steps={total_steps!r} must be an integer >= 1 or null")
        self.start_ratio, self.end_ratio, self.interval = float(start_ratio), float(end_ratio), interval
        self.beta, self.eps, self.total_steps = float(beta), float(eps), total_steps
        self.total = 0
        self.last_step = -1
        self.adaloras: list = []
        self._pending_adalora: list[dict] | None = None

    # -- setup -------------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from zoo.adapters.dynamic_rank import adalora_tuners, rank_one_layers

        self.layers = [m for _, m in rank_one_layers(pl_module)]
        self.adaloras = adalora_tuners(pl_module)
        if not self.layers and not self.adaloras:
            raise ValueError("RankSchedule: the module has no DynamicRank (RankOneLinear) or AdaLoRA layer; add "
                             "zoo.adapters.dynamic_rank.DynamicRank or .AdaLoRA to its `surgery`")
        budget = sum(m.target_rank for m in self.layers)
        if budget > sum(m.initial_rank for m in self.layers):
            raise ValueError(f"RankSchedule: the budget {budget} is larger than the initial rank total "
                             f"{sum(m.initial_rank for m in self.layers)}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: there ``estimated_stepping_batches`` would build the training loader before Lightning
        # restores the checkpoint's loader state, and a run resumed mid-epoch would restart its epoch from batch 0.
        estimated = trainer.estimated_stepping_batches
        if self.total_steps is not None and estimated != float("inf") and self.total_steps > estimated:
            raise ValueError(f"RankSchedule: total_steps={self.total_steps} is beyond training ({int(estimated)} optimizer steps "
                             "from the trainer's max_epochs / max_steps); lower it or leave it null")
        if self.total_steps is None and estimated == float("inf"):
            raise ValueError("RankSchedule: training has no known length (max_epochs: -1 and no max_steps); set total_steps")
        self.total = int(self.total_steps or estimated)
        for tuner in self.adaloras:
            self._configure_adalora(tuner)
        if self._pending_adalora is not None:  # resumed: the allocators' statistics (loaded after on_fit_start under FSDP)
            self._load_adalora(self._pending_adalora)
            self._pending_adalora = None

    def _configure_adalora(self, tuner) -> None:
        config = tuner.peft_config[tuner.trainable_adapter_name]
        tinit, tfinal = int(self.total * self.start_ratio), int(self.total * self.end_ratio)
        if tinit >= self.total - tfinal:
            raise ValueError(f"RankSchedule: with {self.total} steps, AdaLoRA's tinit={tinit} and tfinal={tfinal} leave no "
                             "budgeting phase; train longer or lower start_ratio / end_ratio")
        config.tinit, config.tfinal, config.deltaT = tinit, tfinal, self.interval
        tuner.rankallocator.set_total_step(self.total)

    # -- the schedule ------------------------------------------------------------------------------------------------
    def prune_steps(self, step: int) -> tuple[int, int]:
        """``(p, P)``: the pruning step of optimizer step ``step`` and the last one (official ``get_prune_step``)."""
        return int(step - self.total * self.start_ratio), int(self.total * (1 - self.start_ratio - self.end_ratio))

    def prune_count(self, p: int, last: int, n: int) -> int:
        """Components at or below the threshold at pruning step ``p`` (cubic; official ``prune_lora_scaler``)."""
        start = self.layers[0].initial_rank
        end = sum(m.target_rank for m in self.layers) / len(self.layers)
        progress = 1.0 if last <= 0 else p / last  # official divides by P; P = 0 (a one-step run) means "prune at once"
        return max(int(n * ((start - end) / start) * progress**3), 1)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_step:  # gradient accumulation: no optimizer step this batch
            return
        self.last_step = step
        for tuner in self.adaloras:
            tuner.update_and_allocate(step)
        if self.layers:
            self.step_dynamic_rank(step)

    def step_dynamic_rank(self, step: int) -> None:
        p, last = self.prune_steps(step)
        if p > last:
            for m in self.layers:
                m.enforce_mask()
            return
        for m in self.layers:
            m.update_importance(self.beta, self.eps)
        if p < 0 or not (p % self.interval == 0 or p == last):
            return
        scores = torch.cat([m.importance for m in self.layers])
        k = self.prune_count(p, last, scores.numel())
        threshold = torch.kthvalue(scores.cpu(), k).values.to(scores.device)
        for m in self.layers:
            m.prune(threshold, final=p == last)

    # -- checkpointed state ------------------------------------------------------------------------------------------
    STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft's RankAllocator keeps them as attributes, not in a state dict

    def state_dict(self) -> dict:
        """The last step seen and, per AdaLoRA, its allocator's importance statistics and final rank pattern (peft keeps
        them outside the module's state dict, so without them a resumed run would restart them)."""
        state: dict = {"last_step": self.last_step}
        if self.adaloras:
            state["adalora"] = [
                {**{k: {n: t.detach().clone() for n, t in getattr(tuner.rankallocator, k).items()} for k in self.STATISTICS},
                 "rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern}
                for tuner in self.adaloras]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step", -1)
        self._pending_adalora = state_dict.get("adalora")  # applied in on_train_start, once the tuners are known

    def _load_adalora(self, states: list[dict]) -> None:
        if len(states) != len(self.adaloras):
            raise ValueError(f"RankSchedule: the checkpoint holds the statistics of {len(states)} AdaLoRA surgeries, the module "
                             f"has {len(self.adaloras)}")
        for tuner, state in zip(self.adaloras, states):
            params = dict(tuner.model.named_parameters())
            allocator = tuner.rankallocator
            for k in self.STATISTICS:
                setattr(allocator, k, {n: t.to(params[n].device) for n, t in state[k].items()})
            tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def total_rank(module: torch.nn.Module) -> int:
    """The budget in use, as the official code counts it: nonzero scalars (DoRA) or nonzero ``lora_E`` (AdaLoRA)."""
    from zoo.adapters.dynamic_rank import rank_one_layers

    n = sum(m.rank for _, m in rank_one_layers(module))
    return n + sum(int((p != 0).sum()) for name, p in module.named_parameters() if "lora_E" in name)
