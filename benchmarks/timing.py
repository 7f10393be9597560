"""Timing helpers shared by the benchmark scripts (imported as ``timing``: scripts run from this folder)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from lightning.pytorch import Callback


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


class StepTimer(Callback):
    """Wall time of every training step, batch start to batch end (callbacks attached after it included).

    Example::

        timer = StepTimer()
        Trainer(max_steps=40, callbacks=[timer]).fit(model, data)
        statistics.median(timer.times[5:])
    """

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)
