"""Timing helpers shared by the benchmark scripts (imported as ``timing``: scripts run from this folder)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator

import torch
from lightning.pytorch import Callback


def batch_indices(n: int, batch: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The rows of each of ``steps`` batches of a plain loop: consecutive slices of one seeded permutation of ``n`` rows
    (wrapping around), so a plain loop and its Lightning twin read the same samples in the same order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for i in range(steps):
        yield perm[(i * batch) % (n - batch):][:batch]


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


class PeriodTimer(Callback):
    """Training steps after ``warmup`` batches, batch fetching included: first timed batch start to last batch end.

    Example::

        timer = PeriodTimer(warmup=30)
        Trainer(max_steps=330, callbacks=[timer]).fit(model, data)
        (timer.end - timer.start) / timer.steps
    """

    def __init__(self, warmup: int):
        self.warmup = warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warmup


class EpochTimer(Callback):
    """Wall time of every training epoch, split into its training batches and its validation.

    ``epochs`` holds ``(train seconds, validation seconds, whole epoch seconds)`` per epoch (in
    Lightning 2 an epoch's validation runs before ``on_train_epoch_end``). Use with
    ``num_sanity_val_steps=0``.

    Example::

        timer = EpochTimer()
        Trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[timer]).fit(model, data)
        train_s, val_s, epoch_s = timer.epochs[-1]
    """

    def __init__(self):
        self.epochs: list[tuple[float, float, float]] = []

    def on_train_epoch_start(self, *args) -> None:
        self._start, self._val = time.perf_counter(), None

    def on_validation_epoch_start(self, *args) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, *args) -> None:
        self._val = (self._val_start, time.perf_counter())

    def on_train_epoch_end(self, *args) -> None:
        end = time.perf_counter()
        val_start, val_end = self._val or (end, end)
        self.epochs.append((val_start - self._start, val_end - val_start, end - self._start))
