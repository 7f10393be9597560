"""Issue 16, item 21: lottery-ticket rewinding to step k also rewinds the LR schedule to step k (Frankle et al. 2020)."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.pruning import LotteryTicket
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo import Classifier

LR, K, ROUND, STEPS = 0.1, 1, 4, 10
SCHEDULES = {  # the scheduler and its LR at step s, by hand
    "step": (functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5), lambda s: LR * 0.5 ** (s // 2)),
    "linear": (functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.1, total_iters=10),
               lambda s: LR * (1.0 - 0.9 * min(s, 10) / 10)),
}


class LRProbe(Callback):
    """The LR of every param group used by the optimizer step at each global step."""

    def __init__(self):
        self.lrs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]


def _module(scheduler) -> Classifier:
    return Classifier(TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS, optimizer=functools.partial(torch.optim.SGD, lr=LR),
                      lr_scheduler=scheduler, scheduler_interval="step")


def _fit(scheduler, rewind_lr, max_steps=STEPS, callbacks=(), ckpt_path=None) -> tuple[LotteryTicket, LRProbe]:
    seed_everything(0)
    lt = LotteryTicket(rounds=2, rate=0.5, round_steps=ROUND, rewind_step=K, patterns=["backbone.blocks.*"], make_permanent=False, rewind_lr=rewind_lr)
    probe = LRProbe()
    trainer = Trainer(max_steps=max_steps, logger=False, enable_checkpointing=bool(callbacks), callbacks=[lt, probe, *callbacks], enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(_module(scheduler), Digits(batch_size=32), ckpt_path=ckpt_path)
    return lt, probe


def _expected(lr_at, rewind_lr: bool) -> dict[int, float]:
    """Step s of round r >= 1 trains with the LR of step k + (s - r * round_steps) when rewinding the schedule."""
    out = {}
    for s in range(STEPS):
        r = min(s // ROUND, 2)
        out[s] = lr_at(K + s - r * ROUND if rewind_lr and r else s)
    return out


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("rewind_lr", [True, False])
def test_round_restarts_the_lr_schedule_at_step_k(name, rewind_lr):
    scheduler, lr_at = SCHEDULES[name]
    lt, probe = _fit(scheduler, rewind_lr)
    assert [h[0] for h in lt.history] == [ROUND, 2 * ROUND]
    expected = _expected(lr_at, rewind_lr)
    for step in range(STEPS):
        assert probe.lrs[step] == pytest.approx([expected[step]] * len(probe.lrs[step]), rel=1e-9), step
    # right after each round the LR is that of step k only when the schedule is rewound
    for step in (ROUND, 2 * ROUND):
        assert (probe.lrs[step][0] == pytest.approx(lr_at(K))) == rewind_lr
        assert lr_at(K) != pytest.approx(lr_at(step))  # the two cases differ, so the check can fail


def test_resume_keeps_the_rewound_schedule(tmp_path):
    """The scheduler states saved at step k are in the callback state: a run resumed after round 1 rewinds the LR alike."""
    scheduler, lr_at = SCHEDULES["step"]
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    _, full = _fit(scheduler, True, callbacks=[ckpt])
    saved = torch.load(tmp_path / "step=6.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("LotteryTicket"))
    assert state["rewind_schedule"]["schedulers"][0]["last_epoch"] == K
    assert state["rewind_schedule"]["param_groups"][0][0]["lr"] == pytest.approx(lr_at(K))
    _, resumed = _fit(scheduler, True, ckpt_path=tmp_path / "step=6.ckpt")
    assert sorted(resumed.lrs) == list(range(6, STEPS))
    for step in range(6, STEPS):
        assert resumed.lrs[step] == full.lrs[step]
    assert resumed.lrs[2 * ROUND][0] == pytest.approx(lr_at(K))
