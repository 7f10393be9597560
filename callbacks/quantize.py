"""Quantisation callbacks (issue 20): post-training int8 after ``fit``, and quantisation-aware training on a schedule.

Both end a fit with a quantised module (torchao int8, :mod:`zoo.quantize`): ``trainer.test`` then evaluates the int8
model, and ``<checkpoint dir>/quantized.ckpt`` holds it (``zoo.load_zoo_module`` reloads it: the checkpoint's
``surgery`` ends with :class:`zoo.quantize.Quantize`). ``last.ckpt`` / ``best.ckpt`` stay float. Layers a scheme cannot
handle, a QAT start after the run's last step and an empty calibration set fail before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from zoo.quantize import fake, pt2e_qat
from zoo.quantize.calibration import Calibrator, MinMax, relative_error, state_bytes, take_batches
from zoo.quantize.layers import BATCHNORMS, has_batchnorm, select_layers
from zoo.quantize.pt2e import pt2e_layers
from zoo.quantize.ptq import QuantizeReport, _logits, check_reloadable, quantize_module
from zoo.quantize.schemes import get_scheme
from zoo.quantize.surgery import Quantize
from zoo.surgery import Surgery
from zoo.surgery import instantiate as instantiate_surgery

SPLITS = ("train", "val")
# read by zoo.sharding.check_strategy (a callback's ``sharding`` attribute): refused under sharding before training
SHARDED_CONVERSION = ("the int8 conversion (torchao quantize_) replaces whole weight tensors, which FSDP2 holds as DTensor "
                      "shards; under sharding {}, then quantise the saved checkpoint on one process (zoo test --ckpt_path "
                      "<last.ckpt> with callbacks.quantize.PostTrainingQuantization)")


def calibration_loader(trainer: Trainer, split: str):
    """The datamodule's loader of ``split`` (a fresh one, as any user of a datamodule would build it)."""
    if trainer.datamodule is not None:
        return getattr(trainer.datamodule, f"{split}_dataloader")()
    loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    if loader is None:
        raise ValueError(f"calibration_split={split!r}: the trainer has no {split} loader (give a datamodule)")
    return loader[0] if isinstance(loader, (list, tuple)) else loader


def save_quantized(trainer: Trainer, save_to: str | None) -> str | None:
    """Save the (now quantised) module next to the run's checkpoints; returns the path."""
    if not save_to:
        return None
    ckpt = trainer.checkpoint_callback
    folder = Path(getattr(ckpt, "dirpath", None) or trainer.default_root_dir)
    path = Path(save_to) if Path(save_to).is_absolute() else folder / save_to
    trainer.save_checkpoint(path, weights_only=True)
    return str(path)


def publish(trainer: Trainer, report: QuantizeReport, path: str | None, prefix: str) -> None:
    rank_zero_info(f"{prefix}: {report}" + (f"; saved to {path}" if path else ""))
    if trainer.logger is not None:
        trainer.logger.log_metrics({f"quantize/{k}": float(v) for k, v in report.as_dict().items() if k != "scheme"}, step=trainer.global_step)


class PostTrainingQuantization(Callback):
    """Quantise the module's backbone to int8 at the end of ``fit`` (torchao ``quantize_``), calibrated on the first
    ``calibration_batches`` of the datamodule's ``calibration_split``; log the int8-vs-float logit error and sizes;
    save ``quantized.ckpt``. Then ``trainer.test`` evaluates the int8 model. Without a fit, ``zoo test`` (or
    ``validate``) with ``--ckpt_path float.ckpt`` quantises the loaded model first: the zoo's quantise step. A module
    that is int8 already (``--ckpt_path quantized.ckpt``) is left as it is.

    Args:
        scheme: ``int8_weight_only``, ``int8_dynamic`` (per-token activation scales at run time: the calibration
            batches only measure the error) or ``int8_static`` (activation scales from the calibration batches).
        layers, exclude: globs of the backbone's layer names (default: every ``nn.Linear``).
        calibration_split: ``train`` or ``val``.
        calibration_batches: how many batches calibrate (and measure).
        calibrator: how scales are chosen (:class:`zoo.quantize.MinMax` by default).
        fold_bn: fold BatchNorm into convolutions first, where the model has BatchNorm.
        compile: ``torch.compile`` the int8 backbone (CPU int8 is only fast compiled).
        save_to: file name in the run's checkpoint folder (or an absolute path); null: not saved.
        prepare: surgery applied to the trained backbone right before quantising (and recorded in the module's
            surgery, so the int8 checkpoint reloads), e.g. ``zoo.quantize.splitquant.SplitQuant`` (SplitQuant splits
            outlier-heavy layers after training, where their ranges are known).
    """

    def __init__(self, scheme: str = "int8_dynamic", layers: list[str] | None = None, exclude: list[str] = (),
                 calibration_split: str = "train", calibration_batches: int = 8, calibrator: Calibrator | None = None,
                 fold_bn: bool = True, compile: bool = False, save_to: str | None = "quantized.ckpt",
                 prepare: list[Surgery] | None = None):
        get_scheme(scheme)
        if calibration_split not in SPLITS:
            raise ValueError(f"calibration_split={calibration_split!r}: expected one of {', '.join(SPLITS)}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches}: a calibration set needs at least 1 batch")
        self.scheme, self.layers, self.exclude = scheme, layers, list(exclude)
        self.calibration_split, self.calibration_batches = calibration_split, calibration_batches
        self.calibrator = calibrator or MinMax()
        self.fold_bn, self.compile, self.save_to = fold_bn, compile, save_to
        self.prepare = [instantiate_surgery(t) for t in prepare or []]
        self.sharding = SHARDED_CONVERSION.format("fit without it")  # refused under sharding strategies before training (zoo.sharding.check_strategy)
        self.report: QuantizeReport | None = None
        self.path: str | None = None

    def quantizer(self, backbone: torch.nn.Module) -> Quantize:
        return Quantize(self.scheme, self.layers, self.exclude, fold_bn=self.fold_bn and has_batchnorm(backbone), compile=self.compile)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_reloadable(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.quantizer(pl_module.backbone).select(pl_module.backbone)  # after the module's surgery; fails on bad layers

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = calibration_loader(trainer, self.calibration_split)
        if len(loader) == 0:
            raise ValueError(f"the calibration set ({self.calibration_split} split) has 0 batches: give the datamodule data for "
                             f"that split or set calibration_split to one of {', '.join(s for s in SPLITS if s != self.calibration_split)}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.quantize(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # `zoo validate --ckpt_path float.ckpt`: quantise, then validate
            self.quantize(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.quantize(trainer, pl_module)  # `zoo test --ckpt_path float.ckpt`: quantise, then test (after fit: done already)

    def quantize(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Quantise ``pl_module`` unless it is quantised already (a reloaded int8 checkpoint, or after fit)."""
        if any(isinstance(t, Quantize) for t in getattr(pl_module, "surgery", [])):
            return
        what = f"{self.calibration_split} split"
        batches = take_batches(calibration_loader(trainer, self.calibration_split), self.calibration_batches, what)
        for t in self.prepare:
            pl_module.backbone = t.apply(pl_module.backbone)
            pl_module.surgery.append(t)
        self.report = quantize_module(pl_module, self.quantizer(pl_module.backbone), batches, self.calibrator)
        self.path = save_quantized(trainer, self.save_to)
        publish(trainer, self.report, self.path, "PostTrainingQuantization")


class QuantizationAwareTraining(Callback):
    """Quantisation-aware training on a schedule with torchao's fake quantizers (:mod:`zoo.quantize.fake`).

    The backbone's Linear layers fake-quantise (int8 per-row symmetric weights; per-token activations for
    ``int8_dynamic``) from ``start_step`` until ``end_step`` (global steps; null: to the end), and only then.
    From ``freeze_step`` the weight scales stay as they were (observer freezing); from ``bn_freeze_step`` the
    BatchNorm statistics stay as they are (BN in eval mode), and at the end BatchNorm is folded into the convolutions
    before conversion. With ``convert`` the fit ends with the real int8 model (torchao ``quantize_``, as
    :class:`PostTrainingQuantization`), saved to ``save_to``. The frozen scales are this callback's checkpointed state,
    so a run resumed mid-QAT continues with the same ones.

    Composes with distillation (only the student's backbone is touched; teachers stay float) and with gradual pruning
    (the fake quantizers act on the masked weight; list the pruning callback first so its masks are made permanent
    before conversion). The fake quantizers compute what the converted int8 layers compute (frozen scales included).

    ``int8_pt2e`` (convolutional backbones, :mod:`zoo.quantize.pt2e_qat`): at fit start the backbone is exported in
    training mode and prepared by torchao's ``prepare_qat_pt2e`` (X86 Inductor quantizer, QAT config: Conv+BN trained
    through the folded, fake-quantised weights); outside the window its fake quantizers and observers are off, from
    ``freeze_step`` the observers are off (ranges frozen), from ``bn_freeze_step`` the graph's BatchNorm uses running
    statistics; ``convert_pt2e`` at the end folds BatchNorm. Checkpoints hold the float backbone (its keys) and this
    callback's quantizer state; a resumed run prepares again and restores it. Not with pruning callbacks or feature
    distillation taps (the exported graph runs no module hooks), nor under sharding (``torch.export`` needs whole
    parameters).

    Args:
        scheme: ``int8_dynamic``, ``int8_weight_only`` (Linears) or ``int8_pt2e`` (the whole exported backbone).
        start_step, end_step, freeze_step, bn_freeze_step: the schedule, in optimizer steps.
        layers, exclude: globs of the backbone's layer names (default: every ``nn.Linear``).
        convert: end the fit with the int8 model; ``false`` leaves a float model trained with fake quantisation.
        report_batches: training batches on which the conversion's logit error is measured.
        compile, save_to: as in :class:`PostTrainingQuantization`.
    """

    def __init__(self, scheme: str = "int8_dynamic", start_step: int = 0, end_step: int | None = None, freeze_step: int | None = None,
                 bn_freeze_step: int | None = None, layers: list[str] | None = None, exclude: list[str] = (), convert: bool = True,
                 report_batches: int = 2, compile: bool = False, save_to: str | None = "quantized.ckpt"):
        self._scheme = get_scheme(scheme, qat=True)
        if self._scheme.pt2e and layers is not None:
            raise ValueError(f"scheme 'int8_pt2e' quantises the whole exported backbone: leave layers unset (got layers={layers}); "
                             "use `exclude` to keep modules in float")
        # read by zoo.sharding.check_strategy: refused under sharding strategies before training
        self.sharding = ("torch.export traces the whole backbone for int8_pt2e QAT, which a sharded (DTensor) backbone is not"
                         if self._scheme.pt2e else SHARDED_CONVERSION.format("train with convert: false") if convert else None)
        if start_step < 0:
            raise ValueError(f"start_step={start_step}: expected a step >= 0")
        if end_step is not None and end_step <= start_step:
            raise ValueError(f"end_step={end_step} must come after start_step={start_step}")
        if freeze_step is not None and not (start_step <= freeze_step and (end_step is None or freeze_step < end_step)):
            raise ValueError(f"freeze_step={freeze_step}: expected a step in the fake-quant window [start_step={start_step}, end_step={end_step})")
        if bn_freeze_step is not None and bn_freeze_step < 0:
            raise ValueError(f"bn_freeze_step={bn_freeze_step}: expected a step >= 0")
        if report_batches < 1:
            raise ValueError(f"report_batches={report_batches}: the conversion is measured on at least 1 batch")
        self.scheme, self.start_step, self.end_step, self.freeze_step = scheme, start_step, end_step, freeze_step
        self.bn_freeze_step, self.layers, self.exclude, self.convert = bn_freeze_step, layers, list(exclude), convert
        self.report_batches, self.compile, self.save_to = report_batches, compile, save_to
        self.frozen: dict[str, dict[str, torch.Tensor]] | None = None  # weight scales since freeze_step (checkpointed)
        self.quantizer_state: dict[str, torch.Tensor] | None = None  # int8_pt2e: the QAT graph's quantizers (checkpointed)
        self.example_shape: list[int] | None = None
        self._graph = None
        self._frozen_applied = False
        self.names: list[str] = []
        self.active_steps: list[int] = []  # global steps trained with fake quantisation on (for tests and logs)
        self.report: QuantizeReport | None = None
        self.path: str | None = None

    def active(self, step: int) -> bool:
        return step >= self.start_step and (self.end_step is None or step < self.end_step)

    def _last_step_error(self, total: int, how: str) -> ValueError:
        return ValueError(f"QuantizationAwareTraining start_step={self.start_step} is at or after the run's last step: the run "
                          f"trains {total} steps ({how}); lower start_step or train longer")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.fast_dev_run:
            rank_zero_warn(f"fast_dev_run: QuantizationAwareTraining's schedule (start_step={self.start_step}) is not checked")
        elif trainer.max_steps is not None and trainer.max_steps >= 0 and self.start_step >= trainer.max_steps:
            raise self._last_step_error(trainer.max_steps, f"max_steps={trainer.max_steps}")
        if self.convert:
            check_reloadable(pl_module)
        from callbacks.pruning.base import MaskedPruning

        pruning = [type(c).__name__ for c in trainer.callbacks if isinstance(c, MaskedPruning)]
        if self._scheme.pt2e and pruning:
            raise ValueError(f"QuantizationAwareTraining(scheme='int8_pt2e') runs the exported graph, where {', '.join(pruning)}'s "
                             "masking hooks do not run: prune in an earlier fit, or use scheme int8_dynamic / int8_weight_only")
        taps = [t.name for t in getattr(pl_module, "losses", []) if callable(getattr(t, "request", None)) and t.request("student")]
        if self._scheme.pt2e and taps:
            raise ValueError(f"QuantizationAwareTraining(scheme='int8_pt2e') replaces the student's backbone by its exported graph, "
                             f"which has none of the layers that the loss terms {', '.join(taps)} read features from: distil logits "
                             "only (soft_target_kl, hard_distill, decoupled_kd) during int8_pt2e QAT, or use scheme int8_dynamic / "
                             "int8_weight_only")
        mine = trainer.callbacks.index(self)
        late = [type(c).__name__ for c in trainer.callbacks[mine + 1:] if isinstance(c, MaskedPruning)]
        if late and self.convert:
            raise ValueError(f"{', '.join(late)} comes after QuantizationAwareTraining in the callbacks: list pruning first, so that "
                             "its masks are made permanent before the model is converted to int8")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        backbone = pl_module.backbone  # after the module's surgery (configure_model)
        if self._scheme.pt2e:
            self.names = pt2e_layers(backbone, self._scheme, self.exclude)
        else:
            self.names = select_layers(backbone, self._scheme, self.layers, self.exclude)
        if self.bn_freeze_step is not None and not has_batchnorm(backbone):
            raise ValueError(f"bn_freeze_step={self.bn_freeze_step}: {type(backbone).__name__} has no BatchNorm layer; remove it")
        if not self._scheme.pt2e:
            fake.attach(backbone, self.names, self._scheme)
            return
        with torch.random.fork_rng(devices=[]):  # a look at one training batch, leaving the run's random stream as it was
            batch = take_batches(calibration_loader(trainer, "train"), 1, "train split")
            with Quantize("int8_pt2e").recording(backbone) as inputs:
                pl_module.eval()
                _logits(pl_module, [pl_module.transfer_batch_to_device(batch[0], pl_module.device, 0)])
                pl_module.train()
        self.example_shape = list(inputs[0].shape[1:])
        example = torch.zeros(2, *self.example_shape, device=inputs[0].device)
        pl_module.backbone = self._graph = pt2e_qat.prepare(backbone, example, self.exclude)
        if self.quantizer_state is not None:  # a resumed run: the quantizers as they were saved
            pt2e_qat.load_quantizer_state(self._graph, self.quantizer_state)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not in on_fit_start: there ``estimated_stepping_batches`` would build the training loader before Lightning
        # restores the checkpoint's loader state, and a run resumed mid-epoch would restart its epoch from batch 0.
        total = trainer.estimated_stepping_batches
        if self.start_step >= total and not trainer.fast_dev_run:
            raise self._last_step_error(int(total), f"max_epochs={trainer.max_epochs} x {trainer.num_training_batches} batches"
                                        + (f" / accumulate_grad_batches={trainer.accumulate_grad_batches}" if trainer.accumulate_grad_batches > 1 else ""))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        backbone, step = pl_module.backbone, trainer.global_step
        on = self.active(step)
        if on:
            self.active_steps.append(step)
        if self._scheme.pt2e:
            pt2e_qat.sync_mode(backbone, pl_module.training)
            pt2e_qat.broadcast_quantizers(backbone)
            pt2e_qat.set_window(backbone, fake_quant=on, observe=on and (self.freeze_step is None or step < self.freeze_step))
            if self.bn_freeze_step is not None and step >= self.bn_freeze_step:
                pt2e_qat.freeze_batchnorm(backbone)
            return
        fake.set_enabled(backbone, on)
        if self.freeze_step is not None and step >= self.freeze_step:
            if self.frozen is None:
                self.frozen = fake.freeze(backbone)
                self._frozen_applied = True
            elif not self._frozen_applied:
                fake.restore_frozen(backbone, self.frozen)
                self._frozen_applied = True
        if self.bn_freeze_step is not None and step >= self.bn_freeze_step:
            for m in backbone.modules():
                if isinstance(m, BATCHNORMS):
                    m.eval()  # again at every step: Lightning puts the module back in training mode after validation

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        backbone = pl_module.backbone
        if self._scheme.pt2e:
            return self._finish_pt2e(trainer, pl_module)
        fake.detach(backbone)
        if not self.convert:
            return
        batches = take_batches(calibration_loader(trainer, "train"), self.report_batches, "train split")
        quantizer = Quantize(self.scheme, self.layers, self.exclude, fold_bn=has_batchnorm(backbone), compile=self.compile)
        if self.frozen is not None:  # the int8 weights use the scales QAT froze, as its fake quantizers did
            quantizer.use_weight_scales({name: qp["scale"] for name, qp in self.frozen.items()})
        self.report = quantize_module(pl_module, quantizer, batches)
        self.path = save_quantized(trainer, self.save_to)
        publish(trainer, self.report, self.path, "QuantizationAwareTraining")

    def _finish_pt2e(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Convert the QAT graph (``convert_pt2e``: BatchNorm folded, int8 weights, the trained activation ranges)."""
        graph = pl_module.backbone
        if not self.convert:
            return
        batches = take_batches(calibration_loader(trainer, "train"), self.report_batches, "train split")
        batches = [pl_module.transfer_batch_to_device(b, pl_module.device, 0) for b in batches]
        training = pl_module.training
        pl_module.eval()
        if not self.active_steps and not pt2e_qat.observed(graph):  # the window never opened (fast_dev_run, a short run)
            rank_zero_warn(f"QuantizationAwareTraining: no step trained with fake quantisation (start_step={self.start_step}); "
                           f"the int8 activation ranges are calibrated on {len(batches)} training batches instead (as PTQ)")
            pt2e_qat.set_window(graph, fake_quant=False, observe=True)
            _logits(pl_module, batches)
        pt2e_qat.set_window(graph, fake_quant=False, observe=False)
        reference, float_bytes = _logits(pl_module, batches), state_bytes(graph)
        pl_module.backbone = pt2e_qat.finish(graph, self.example_shape, compile=self.compile)
        quantizer = Quantize("int8_pt2e", exclude=self.exclude, compile=self.compile, example_shape=self.example_shape, qat=True)
        quantizer.quantized = list(self.names)
        pl_module.surgery.append(quantizer)
        pl_module.hparams["surgery"] = [t.config() for t in pl_module.surgery]
        quantized = _logits(pl_module, batches)
        pl_module.train(training)
        self.report = QuantizeReport("int8_pt2e", len(self.names), relative_error(reference, quantized),
                                     float((quantized.argmax(-1) == reference.argmax(-1)).float().mean()), float_bytes,
                                     pl_module.backbone.int8_bytes())
        self.path = save_quantized(trainer, self.save_to)
        publish(trainer, self.report, self.path, "QuantizationAwareTraining")

    def state_dict(self) -> dict[str, Any]:
        state = {"frozen": self.frozen}
        if self._graph is not None and pt2e_qat.quantizers(self._graph):
            state["quantizers"], state["example_shape"] = pt2e_qat.quantizer_state(self._graph), self.example_shape
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = state_dict.get("frozen")
        self.quantizer_state = state_dict.get("quantizers")
        self._frozen_applied = False
