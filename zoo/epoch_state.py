"""The training epoch's running values in checkpoints, so a run resumed mid-epoch logs the epoch means of a run never
interrupted: :class:`~zoo.classifier.Classifier` keeps ``train/*`` sums (:meth:`~zoo.classifier.Classifier.accumulate`)
and accuracy hits on the device and logs them once at epoch end; without this a resumed epoch's ``train/loss_epoch``
and ``train/acc`` would cover only its batches after the resume.

Saved by every rank (a collective, as Lightning's checkpoint hooks are); restored when training starts, only where
the run goes on from the step and epoch it was saved at (an epoch-end checkpoint starts a new epoch: nothing to add),
each rank its own share (under another number of processes nothing is restored, with a warning).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from zoo.resume import gather_object, rank_and_world

KEY = "zoo_epoch_state"


def save(module: Any, checkpoint: dict[str, Any]) -> None:
    """Put every rank's running ``train/*`` sums and training accuracy counters into ``checkpoint``."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer: no epoch running
        return
    module.flush_hits(module.train_metrics)  # kept batches -> counters (the same counts)
    sums = {k: (v[0].detach().cpu(), v[1]) for k, v in module.epoch_sums.items() if k.startswith("train/")}
    counters = {name: (m.correct.detach().cpu(), m.total.detach().cpu()) for name, m in module.train_metrics.items()
                if hasattr(m, "correct") and m.update_count}
    checkpoint[KEY] = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                       "ranks": gather_object({"sums": sums, "counters": counters})}


def load(module: Any, checkpoint: dict[str, Any]) -> None:
    """Keep the saved state until :func:`restore` (called when training starts)."""
    module._epoch_state = checkpoint.get(KEY)


def restore(module: Any) -> bool:
    """Put this rank's saved sums and counters back when the run continues the saved epoch at the saved step;
    whether anything was restored."""
    state, module._epoch_state = getattr(module, "_epoch_state", None), None
    trainer = module.trainer
    if state is None or (state["epoch"], state["step"]) != (trainer.current_epoch, trainer.global_step):
        return False
    ranks = state["ranks"]
    rank, world = rank_and_world()
    if len(ranks) != world:
        rank_zero_warn(f"The checkpoint's running epoch values come from {len(ranks)} process(es), this run has {world}: "
                       "the resumed epoch's train/* means and accuracy cover only its batches after the resume.")
        return False
    mine = ranks[rank]
    module.epoch_sums.update({k: [total.to(module.device), n] for k, (total, n) in mine["sums"].items()})
    for name, (correct, total) in mine["counters"].items():
        metric = module.train_metrics[name]
        metric.reset()
        metric.update(counts=(correct.to(metric.correct.device), total.to(metric.total.device)))
    return bool(mine["sums"] or mine["counters"])
