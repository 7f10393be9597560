"""PD-Quant-style calibration: activation scales chosen by the change in the network's predictions.

Liu et al., "PD-Quant: Post-Training Quantization based on Prediction Difference Metric", CVPR 2023 (official code
github.com/hustvl/PD-Quant). Min-max (and the feature-MSE search of the official ``UniformAffineQuantizer``) choose
each layer's scale from that layer's inputs alone; PD-Quant judges a scale by the KL divergence between the float and
the quantised network's predictions at temperature ``T`` (``block_recon.LossFunction``: ``KLDivLoss(batchmean)`` of
``log_softmax(q / T)`` against ``softmax(fp / T)``, divided by ``lamb_r``, plus the block output's MSE). The official
code then learns the scales by gradient with AdaRound weights; for the zoo's int8 static scheme (per-tensor
activation scales, per-row min-max weights) this module keeps PD-Quant's objective and searches the official grid of
clipping ranges (``perform_1D_search``: ``max|x| * i / num``, ``num = 100``) instead:

* start from min-max (ratio 1, a grid point), every layer fake-quantised as torchao's ``int8_static`` computes it
  (activations ``round(x / s)`` in [-128, 127]; weights per row, ``absmax / 127.5``);
* layer by layer in model order (``rounds`` passes), try each candidate ratio with every other layer at its current
  scale and keep the one with the lowest loss over the calibration batches: ``KL_T + lamb_r * MSE(layer output)``
  (the official ratio of the two terms). A candidate is kept only if strictly better, so the loss never rises above
  min-max's: with ``lamb_r = 0`` the prediction KL on the calibration batches is at most min-max's.

Use as ``calibrator`` of :class:`callbacks.quantize.PostTrainingQuantization` with ``scheme: int8_static``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from zoo.quantize.calibration import Calibrator, MinMax

QMIN, QMAX = -128, 127


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` through symmetric int8 with ``scale`` (torchao's ``quantize_affine``: ``round(x * (1 / scale))``, so
    exact halves round as torchao rounds them), dequantised."""
    return torch.clamp(torch.round(x * (1.0 / scale)), QMIN, QMAX) * scale


def fake_quant_rows(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 of a weight matrix, as torchao's ``Int8Tensor`` (scale ``absmax / 127.5``)."""
    scale = (w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) / ((QMAX - QMIN) / 2)).clamp_min(1e-12)
    return fake_quant(w, scale)


def prediction_kl(quantized: torch.Tensor, reference: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """PD-Quant's prediction difference: ``KL(softmax(ref / T) || softmax(q / T))`` averaged over samples."""
    q, r = quantized.float().flatten(0, -2), reference.float().flatten(0, -2)
    return F.kl_div(F.log_softmax(q / temperature, -1), F.softmax(r / temperature, -1), reduction="batchmean")


class PDQuant(Calibrator):
    """Per-layer activation scales minimising the prediction difference (see the module docstring).

    Args:
        grid: candidate clipping ranges ``peak * i / grid`` (official ``num = 100``).
        min_ratio: smallest ratio tried (``i / grid >= min_ratio``; int8 never gains from clipping most of the range).
        temperature: ``T`` of the KL (official ``--T 4.0``).
        lamb_r: weight of the layer-output MSE regulariser against the KL (official ``--lamb_r 0.1``; 0: KL only).
        rounds: passes over the layers (coordinate descent).
    """

    def __init__(self, grid: int = 100, min_ratio: float = 0.3, temperature: float = 4.0, lamb_r: float = 0.1, rounds: int = 1):
        if grid < 1:
            raise ValueError(f"grid={grid}: expected at least 1 candidate")
        if not 0 < min_ratio <= 1:
            raise ValueError(f"min_ratio={min_ratio}: expected a ratio in (0, 1]")
        if temperature <= 0 or lamb_r < 0 or rounds < 1:
            raise ValueError(f"temperature={temperature} (> 0), lamb_r={lamb_r} (>= 0), rounds={rounds} (>= 1)")
        self.grid, self.min_ratio, self.temperature, self.lamb_r, self.rounds = grid, min_ratio, temperature, lamb_r, rounds
        self.ratios: dict[str, float] = {}  # chosen clipping ratio per layer (1.0: min-max kept)
        self.kl_minmax: float | None = None  # prediction KL on the calibration batches at min-max scales / at the chosen ones
        self.kl: float | None = None

    def candidates(self) -> list[float]:
        first = max(1, math.ceil(self.min_ratio * self.grid - 1e-9))
        return [i / self.grid for i in range(self.grid, first - 1, -1)]  # 1.0 (min-max) first

    @torch.no_grad()
    def calibrate(self, run: Callable[[Any], torch.Tensor], model: nn.Module, layers: list[str], batches: list) -> dict[str, torch.Tensor]:
        peaks = MinMax().calibrate(run, model, layers, batches)  # peak / 127, shaped as each layer's input
        layers = [n for n in layers if n in peaks]
        modules = {n: model.get_submodule(n) for n in layers}
        reference, features = self._float_pass(run, modules, batches)
        scales = dict(peaks)
        current: dict[str, torch.Tensor] = {}

        def pre(name):
            return lambda m, args: (fake_quant(args[0], scales[name]),) + tuple(args[1:])

        def post(name):
            return lambda m, args, out: current.setdefault(name, out)

        weights = {n: m.weight.data for n, m in modules.items()}
        handles = [m.register_forward_pre_hook(pre(n)) for n, m in modules.items()]
        handles += [m.register_forward_hook(post(n)) for n, m in modules.items()] if self.lamb_r > 0 else []
        try:
            for n, m in modules.items():
                m.weight.data = fake_quant_rows(weights[n])

            def objective(layer: str | None) -> float:
                total = 0.0
                for i, batch in enumerate(batches):
                    current.clear()
                    loss = prediction_kl(run(batch), reference[i], self.temperature)
                    if self.lamb_r > 0 and layer is not None:
                        loss = loss + self.lamb_r * F.mse_loss(current[layer].float(), features[layer][i])
                    total += float(loss)
                return total / len(batches)

            self.kl_minmax = objective(None)

            self.ratios = {n: 1.0 for n in layers}
            for _ in range(self.rounds):
                for n in layers:
                    best, best_ratio = objective(n), self.ratios[n]
                    for ratio in self.candidates():
                        if ratio == best_ratio:
                            continue
                        scales[n] = peaks[n] * ratio
                        loss = objective(n)
                        if loss < best:
                            best, best_ratio = loss, ratio
                    scales[n] = peaks[n] * best_ratio
                    self.ratios[n] = best_ratio
            self.kl = objective(None)
        finally:
            for h in handles:
                h.remove()
            for n, m in modules.items():
                m.weight.data = weights[n]
        return {n: scales[n].clamp_min(1e-8) for n in layers}

    def _float_pass(self, run, modules: dict[str, nn.Module], batches: list):
        """Float predictions per batch and (for the regulariser) each layer's float output per batch."""
        features: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        handles = [m.register_forward_hook(lambda m, a, out, n=n: features[n].append(out.detach().float()))
                   for n, m in modules.items()] if self.lamb_r > 0 else []
        try:
            reference = [run(b).detach().float() for b in batches]
        finally:
            for h in handles:
                h.remove()
        return reference, features
