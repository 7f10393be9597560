"""Post-training quantisation of a zoo module: calibrate, quantise its backbone, measure what changed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from zoo.batch import as_batch
from zoo.quantize.calibration import Calibrator, MinMax, relative_error, state_bytes
from zoo.quantize.surgery import Quantize


@dataclass
class QuantizeReport:
    scheme: str
    layers: int
    logit_rel_error: float  # ||int8 - float|| / ||float|| over the calibration batches
    top1_agreement: float  # share of calibration samples whose int8 top-1 equals the float top-1
    float_bytes: int
    int8_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"quantised {self.layers} layers ({self.scheme}): logits rel. error {self.logit_rel_error:.4f}, top-1 agreement "
                f"{self.top1_agreement:.4f}, backbone {self.float_bytes / 1e6:.2f} MB -> {self.int8_bytes / 1e6:.2f} MB "
                f"(x{self.int8_bytes / max(self.float_bytes, 1):.2f}) on the calibration batches")


def check_reloadable(module: nn.Module) -> None:
    """A quantised module is saved with ``Quantize`` in its ``surgery`` hyperparameters: fail early where it has none."""
    if getattr(module, "backbone", None) is None or "surgery" not in getattr(module, "hparams", {}):
        raise ValueError(f"{type(module).__name__} has no `backbone` with a `surgery` list in its hyperparameters, so a quantised "
                         "checkpoint of it could not be reloaded; use zoo.Classifier (with `losses:`/`surgery:`) or a preset "
                         "that takes `surgery`")


@torch.no_grad()
def _logits(module: nn.Module, batches: list) -> torch.Tensor:
    run = getattr(module, "batch_logits", None)
    ready = [as_batch(b).ready() for b in batches]  # deferred (on-device) transforms done, as outside the Trainer
    return torch.cat([(run(b) if run else module(b.inputs)).float() for b in ready])


def quantize_module(module: nn.Module, quantizer: Quantize, batches: list, calibrator: Calibrator | None = None) -> QuantizeReport:
    """Quantise ``module.backbone`` in place with ``quantizer`` (calibrated on ``batches`` for a static scheme) and
    record it in the module's surgery, so checkpoints saved from now on reload as the quantised model."""
    check_reloadable(module)
    quantizer.select(module.backbone)  # fails before any work on a layer the scheme cannot handle
    training = module.training
    module.eval()
    batches = [module.transfer_batch_to_device(b, module.device, 0) if hasattr(module, "transfer_batch_to_device") else b for b in batches]
    with quantizer.recording(module.backbone) as inputs:  # int8_pt2e: the float backbone's inputs calibrate its observers
        reference = _logits(module, batches)
    if quantizer._scheme.static:
        calibrator = calibrator or MinMax()
        run = lambda b: _logits(module, [b])  # noqa: E731
        scales = calibrator.calibrate(run, module.backbone, quantizer.select(module.backbone), batches)
        quantizer.calibrated(scales, {n: s.ndim for n, s in scales.items()})
    float_bytes = state_bytes(module.backbone)
    module.backbone = quantizer.apply(module.backbone)
    if quantizer._scheme.pt2e:
        quantizer.observe(module.backbone, inputs)
    module.surgery.append(quantizer)
    module.hparams["surgery"] = [t.config() for t in module.surgery]
    quantized = _logits(module, batches)
    module.train(training)
    return QuantizeReport(quantizer.scheme, len(quantizer.quantized), relative_error(reference, quantized),
                          float((quantized.argmax(-1) == reference.argmax(-1)).float().mean()), float_bytes, state_bytes(module.backbone))
