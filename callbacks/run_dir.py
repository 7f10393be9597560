"""``RemoveFailedRunDir``: a run that fails before its first step leaves no ``version_N`` folder behind.

Without it, every typo in a config leaves a ``runs/lightning_logs/version_N/`` holding only a
``config.yaml`` (and an empty event file), and the next good run gets a higher number. The ``zoo`` command
adds it to every run; a folder that holds a checkpoint, or a run that trained a step, is never removed::

    trainer:
      callbacks: [callbacks.run_dir.RemoveFailedRunDir]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class RemoveFailedRunDir(Callback):
    """On an exception before the first optimizer step, remove the run's log folder if it holds no checkpoint."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        logger = trainer.logger
        if logger is None or trainer.global_step > 0 or not trainer.is_global_zero:
            return
        log_dir = getattr(logger, "log_dir", None)  # TensorBoard/CSV loggers: the version_N folder itself
        if not log_dir or not Path(log_dir).is_dir() or Path(log_dir).resolve() == Path(logger.save_dir).resolve():
            return
        if not any(Path(log_dir).rglob("*.ckpt")):
            shutil.rmtree(log_dir, ignore_errors=True)
