"""``Checkpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state.

With ``save_last=True`` and a ``monitor``, Lightning 2.6's ``ModelCheckpoint`` rewrites ``last.ckpt`` only
when a new best is saved, and a run that stops between two checkpoints never saves its final state.
``Checkpoint`` keeps the top-k logic of ``ModelCheckpoint`` and writes ``last.ckpt`` itself:

- whenever a checkpoint is due (every ``every_n_train_steps`` steps, every ``every_n_epochs`` epochs,
  after every validation during ``fit``), whether or not the monitored value improved;
- at the end of ``fit`` (also a run stopped by ``max_steps`` mid-epoch), so every run ends saved.

``last.ckpt`` is written to a temporary file and renamed, so a run killed while saving leaves the previous
``last.ckpt`` whole. Every run has one: the ``zoo`` command adds it under the name ``checkpoint``::

    zoo fit --config configs/quickstart.yaml --checkpoint.monitor val/loss --checkpoint.mode min
    zoo fit --config configs/quickstart.yaml --checkpoint.every_n_train_steps 50   # step checkpoints
    zoo fit --config configs/quickstart.yaml --ckpt_path runs/lightning_logs/version_0/checkpoints/last.ckpt

YAML::

    checkpoint: {monitor: val/acc, mode: max}     # top-level key of a zoo config
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) whose ``last.ckpt`` is the latest state whenever a checkpoint is written.

    Args:
        save_last: keep ``last.ckpt`` (the latest state; default on). ``False`` keeps only the top-k files.
        save_top_k: how many best checkpoints by ``monitor`` to keep (default 1 with a ``monitor``, else 0:
            without a monitor, ``last.ckpt`` is the one checkpoint).
        every_n_train_steps: also checkpoint every this many optimizer steps (mid-epoch resume points).
        The other arguments are ``ModelCheckpoint``'s.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_last: bool = True,
        save_top_k: int | None = None,
        save_weights_only: bool = False,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        verbose: bool = False,
    ):
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_last=False,
            save_top_k=(1 if monitor else 0) if save_top_k is None else save_top_k,
            save_weights_only=save_weights_only, every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=enable_version_counter, verbose=verbose,
        )
        self.keep_last = save_last
        self.last_every_n_train_steps = every_n_train_steps or 0
        self.last_every_n_epochs = 1 if every_n_epochs is None else every_n_epochs
        self.last_saved_step: int | None = None  # global step of the state in last.ckpt, this run

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key, built once per ``monitor``/``mode`` (its other parts are fixed at init): Lightning
        reads it at every callback hook of every step, and building it (a dict's repr) costs ~3 us each time."""
        setting = (self.monitor, self.mode)
        if self.__dict__.get("_state_key_of") != setting:
            self._state_key_of, self._state_key = setting, super().state_key
        return self._state_key

    # -- when ---------------------------------------------------------------------------------------
    @staticmethod
    def _fitting(trainer: Trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_train_steps
        if n > 0 and trainer.global_step % n == 0:
            self.save_last_state(trainer)

    def _epoch_due(self, trainer: Trainer) -> bool:
        return self.last_every_n_epochs > 0 and (trainer.current_epoch + 1) % self.last_every_n_epochs == 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._epoch_due(trainer) or self.last_every_n_train_steps > 0:
            self.save_last_state(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._epoch_due(trainer):
            self.save_last_state(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # the final state, however the run stopped; written again even when last.ckpt holds this step already, since
        # the module's own batch-end work (k-FPF's final FPF, a stream's last task end) runs after a step save
        self.save_last_state(trainer, force=True)

    # -- how ----------------------------------------------------------------------------------------
    def save_last_state(self, trainer: Trainer, force: bool = False) -> None:
        """Write the current state to ``last.ckpt`` unless it holds this step already (``force``: even then; all ranks
        call this)."""
        if not self.keep_last or not self._fitting(trainer) or (self.last_saved_step == trainer.global_step and not force):
            return
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path  # part of the state being saved, as in ModelCheckpoint
        self.last_saved_step = trainer.global_step
        local = "://" not in path
        tmp = f"{path}.tmp" if local else path
        trainer.save_checkpoint(tmp, self.save_weights_only)  # collective: every rank reaches it
        if local and trainer.is_global_zero:
            replace(tmp, path)
        trainer.strategy.barrier("zoo_last_checkpoint")


def replace(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` atomically, a file or a distributed-checkpoint folder (a sharded run's ``last.ckpt``):
    a folder cannot replace a folder, so the old one is moved aside first and removed after."""
    if os.path.isdir(dst) and not os.path.islink(dst):
        old = f"{dst}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
