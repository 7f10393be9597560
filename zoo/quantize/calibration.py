"""Calibration: the batches a post-training scheme sees, and how activation scales are chosen from them.

A :class:`Calibrator` is a pluggable choice (``MinMax`` here; prediction-aware ones such as PD-Quant choose scales
by the change in the model's predictions instead and override :meth:`Calibrator.calibrate`).
"""

from __future__ import annotations

import io
from itertools import islice
from typing import Any, Callable

import torch
from torch import nn


class Calibrator:
    """Chooses one activation scale per layer from calibration batches."""

    def calibrate(self, run: Callable[[Any], torch.Tensor], model: nn.Module, layers: list[str], batches: list) -> dict[str, torch.Tensor]:
        """``{layer name: scale}`` for the inputs of ``layers`` of ``model``, each scale shaped ``(1,) * rank`` of
        that layer's input; ``run(batch)`` runs the whole module on one calibration batch."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        from zoo import spec

        return spec.config_of(self)


class MinMax(Calibrator):
    """Symmetric min-max: the largest absolute input of each layer over the calibration batches, over 127."""

    @torch.no_grad()
    def calibrate(self, run, model, layers, batches):
        peak: dict[str, torch.Tensor] = {}
        rank: dict[str, int] = {}

        def observe(name):
            def hook(module, args):
                m = args[0].detach().abs().amax().float()
                peak[name] = torch.maximum(peak[name], m) if name in peak else m
                rank[name] = args[0].ndim
            return hook

        handles = [model.get_submodule(n).register_forward_pre_hook(observe(n)) for n in layers]
        try:
            for batch in batches:
                run(batch)
        finally:
            for h in handles:
                h.remove()
        return {n: (peak[n] / 127.0).clamp_min(1e-8).reshape((1,) * rank[n]) for n in layers if n in peak}


def take_batches(loader, n: int, what: str) -> list:
    """The first ``n`` batches of ``loader``; zero batches fail (a calibration set must have data)."""
    if n < 1:
        raise ValueError(f"calibration_batches={n}: a calibration set needs at least 1 batch")
    try:
        size = len(loader)
    except TypeError:
        size = None
    if size == 0:
        raise ValueError(f"the calibration set ({what}) has 0 batches: give the datamodule data for that split, or "
                         "choose another `calibration_split`")
    batches = list(islice(iter(loader), n))
    if not batches:
        raise ValueError(f"the calibration set ({what}) yielded 0 batches")
    return batches


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``||other - reference|| / ||reference||`` (Frobenius), the tolerance the tests state for int8 logits."""
    return float((other.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def state_bytes(model: nn.Module) -> int:
    """Size of ``model``'s state_dict as ``torch.save`` writes it (what the checkpoint's weights cost on disk)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
