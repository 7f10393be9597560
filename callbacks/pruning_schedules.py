"""Pruning schedules: target sparsity as a pure function of the training step (or epoch).

A schedule prunes at ``start``, then every ``frequency`` steps, and reaches ``final_sparsity`` at
``end``; between pruning steps the target stays where the last pruning step put it. With
``p = (t_k - start) / (end - start)`` the progress of the last pruning step ``t_k <= t``:

=================  ==========================================================================
``OneShot``        ``s = final`` from step ``at`` on
``Linear``         ``s = s_i + (s_f - s_i) p``
``Exponential``    density decays geometrically: ``1 - s = (1 - s_i) ((1 - s_f) / (1 - s_i))^p``
                   (every pruning step removes the same fraction of the surviving weights)
``Cubic``          Zhu & Gupta (2017, "To prune, or not to prune"): ``s = s_f + (s_i - s_f)(1 - p)^3``
=================  ==========================================================================

Subclass :class:`PruningSchedule` and override :meth:`curve` for a new shape. From YAML::

    schedule:
      class_path: callbacks.pruning_schedules.Cubic
      init_args: {final_sparsity: 0.8, start: 100, end: 1000, frequency: 50}
"""

from __future__ import annotations

import math


class PruningSchedule:
    """Base schedule. Args:
        final_sparsity: fraction of weights (or channels) pruned at ``end``, in ``[0, 1)``.
        start: first pruning step (or epoch, with ``interval="epoch"``).
        end: last pruning step; ``end >= start``.
        frequency: prune every this many steps between ``start`` and ``end`` (``end`` always prunes).
        initial_sparsity: sparsity set at ``start``; ``0 <= initial_sparsity <= final_sparsity``.
        interval: ``"step"`` (optimizer steps) or ``"epoch"``.
    """

    def __init__(self, final_sparsity: float = 0.5, start: int = 0, end: int = 1000, frequency: int = 100, initial_sparsity: float = 0.0, interval: str = "step"):
        for name, value in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{type(self).__name__}: {name}={value} is outside [0, 1)")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"{type(self).__name__}: initial_sparsity={initial_sparsity} exceeds final_sparsity={final_sparsity}")
        if start < 0:
            raise ValueError(f"{type(self).__name__}: start={start} must be >= 0")
        if end < start:
            raise ValueError(f"{type(self).__name__}: end={end} precedes start={start}; the schedule must end at or after its start")
        if frequency < 1:
            raise ValueError(f"{type(self).__name__}: frequency={frequency} must be >= 1")
        if interval not in ("step", "epoch"):
            raise ValueError(f"{type(self).__name__}: interval={interval!r}: expected 'step' or 'epoch'")
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start, self.end, self.frequency = int(start), int(end), int(frequency)
        self.interval = interval

    def is_pruning_step(self, t: int) -> bool:
        """Whether the target changes (may change) at ``t``."""
        return t == self.end or (self.start <= t < self.end and (t - self.start) % self.frequency == 0)

    def last_pruning_step(self, t: int) -> int | None:
        """The latest pruning step ``<= t`` (``None`` before ``start``)."""
        if t < self.start:
            return None
        if t >= self.end:
            return self.end
        return self.start + (t - self.start) // self.frequency * self.frequency

    def progress(self, t: int) -> float | None:
        """``p`` in ``[0, 1]`` at the last pruning step ``<= t`` (``None`` before ``start``)."""
        t_k = self.last_pruning_step(t)
        if t_k is None:
            return None
        return 1.0 if self.end == self.start else (t_k - self.start) / (self.end - self.start)

    def curve(self, p: float) -> float:
        """Sparsity at progress ``p``; override in subclasses."""
        raise NotImplementedError

    def __call__(self, t: int) -> float:
        p = self.progress(t)
        return 0.0 if p is None else self.curve(p)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(final_sparsity={self.final_sparsity}, start={self.start}, end={self.end}, frequency={self.frequency}, initial_sparsity={self.initial_sparsity}, interval={self.interval!r})"


class OneShot(PruningSchedule):
    """Prune to ``final_sparsity`` at once at step (or epoch) ``at``."""

    def __init__(self, final_sparsity: float = 0.5, at: int = 0, interval: str = "step"):
        super().__init__(final_sparsity, start=at, end=at, frequency=1, initial_sparsity=final_sparsity, interval=interval)

    def curve(self, p: float) -> float:
        return self.final_sparsity


class Linear(PruningSchedule):
    """Sparsity grows linearly from ``initial_sparsity`` at ``start`` to ``final_sparsity`` at ``end``."""

    def curve(self, p: float) -> float:
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * p


class Exponential(PruningSchedule):
    """Density decays geometrically: each pruning step removes the same fraction of the survivors."""

    def curve(self, p: float) -> float:
        return 1.0 - (1.0 - self.initial_sparsity) * math.pow((1.0 - self.final_sparsity) / (1.0 - self.initial_sparsity), p)


class Cubic(PruningSchedule):
    """Gradual pruning of Zhu & Gupta (2017): fast at first, slow near ``final_sparsity``."""

    def curve(self, p: float) -> float:
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** 3
