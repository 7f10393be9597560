"""QAT for convolutional backbones (``QuantizationAwareTraining(scheme="int8_pt2e")``: torchao's PT2E QAT): fake quant only
in the scheduled window, observers and BatchNorm frozen on schedule, the converted int8 model computing what the
fake-quantised model computed, a run resumed mid-QAT equal to an uninterrupted one, the int8 checkpoint reloading, and
the combinations it refuses."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks.quantize import QuantizationAwareTraining
from datamodules import Digits
from zoo import Classifier
from zoo.quantize import Quantize, pt2e_qat, relative_error

class ConvNoBN(nn.Module):
    """A tiny convnet without BatchNorm. (With BatchNorm torchao's QAT conversion, ``_fold_conv_bn_qat``, exports ~120
    pattern graphs: about a minute on any model, too slow for the suite; BatchNorm freezing is tested on the graph.)"""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.stages(x)


def cnn() -> Classifier:
    module = Classifier(None, num_classes=10)
    module.backbone, module.head = ConvNoBN(), nn.Linear(8, 10)
    return module


def fit(callbacks, tmp_path, ckpt_path=None, **kwargs):
    seed_everything(0)
    module = cnn()
    Trainer(logger=False, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            default_root_dir=tmp_path, limit_val_batches=0, **{"max_steps": 4, "enable_checkpointing": False, **kwargs}
            ).fit(module, Digits(batch_size=32), ckpt_path=ckpt_path)
    return module


class Probe(Callback):
    """Per step: fake quant on? observed ranges. At fit end (listed before QAT, so before it
    converts): the fake-quantised model's logits on ``x`` in eval mode."""

    def __init__(self, x):
        self.x, self.on, self.ranges = x, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        q = pt2e_qat.quantizers(pl_module.backbone)
        step = trainer.global_step - 1  # the step that just ran
        self.on[step] = bool(next(iter(q.values())).fake_quant_enabled[0])
        self.ranges[step] = torch.cat([m.activation_post_process.max_val.flatten() for m in q.values()]).clone()

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}  # float keys only
        self.quantizers = pt2e_qat.quantizer_state(pl_module.backbone)
        pl_module.eval()
        self.fake = pl_module(self.x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the QAT graph runs in float32 all the same
            self.under_bf16 = pl_module.backbone(self.x)
        self.features = pl_module.backbone(self.x)


# the converted int8 graph's logits within this relative error of the fake-quantised QAT graph's (the same q/dq math;
# the difference is BatchNorm folded into the weights before rounding, float order; measured ~1e-3 here)
FIDELITY = 0.01


def test_pt2e_qat_window_freezing_fidelity_resume_and_reload(tmp_path):
    x = torch.randn(8, 1, 8, 8)
    probe = Probe(x)
    qat = lambda: QuantizationAwareTraining("int8_pt2e", start_step=1, freeze_step=2, report_batches=1)  # noqa: E731
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    module = fit([probe, qat(), ckpt], tmp_path, enable_checkpointing=True)
    assert probe.on == {0: False, 1: True, 2: True, 3: True}  # fake quant only in [start_step, end)
    ranges = probe.ranges
    assert not torch.isfinite(ranges[0]).any() and torch.isfinite(ranges[1]).all()  # observers off before the window
    assert torch.equal(ranges[1], ranges[3])  # and frozen from freeze_step=2
    with torch.no_grad():
        int8 = module.eval()(x)
    assert relative_error(probe.fake, int8) < FIDELITY
    assert torch.equal(probe.under_bf16, probe.features)
    with torch.no_grad():
        features = module.backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(module.backbone(x), features)  # the int8 graph too runs in float32 under bf16-mixed
    assert len(module.backbone.int8_weights()) == 2  # both convolutions int8
    # step checkpoints are float models (the quantizers are the callback's state)
    saved = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(cnn().state_dict())
    # resumed from step 2 (mid-QAT, observers frozen): the uninterrupted run's weights and quantizers (so its int8 model)
    again = Probe(x)
    fit([again, QuantizationAwareTraining("int8_pt2e", start_step=1, freeze_step=2, convert=False)], tmp_path,
        ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    for mine, theirs in ((again.state, probe.state), (again.quantizers, probe.quantizers)):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(k.endswith("max_val") for k in again.quantizers)
    # the int8 checkpoint reloads (the Quantize surgery it records prepares the float backbone the same way)
    state = torch.load(tmp_path / "ckpt" / "quantized.ckpt", weights_only=True)
    (args,) = [t["init_args"] for t in state["hyper_parameters"]["surgery"]]
    assert args["qat"] and args["example_shape"] == [1, 8, 8]
    reloaded = cnn()
    reloaded.backbone = Quantize(**args).apply(reloaded.backbone)
    reloaded.load_state_dict(state["state_dict"])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), int8)
    # undone (the module's recorded surgery, in reverse): a plain float graph without quantizers computing what the
    # trained float weights compute
    plain = cnn()
    plain.load_state_dict(probe.state)
    quantizing = lambda m: "FakeQuantize" in type(m).__name__ or "Observer" in type(m).__name__  # noqa: E731
    assert any(quantizing(m) for m in module.backbone.prepared.modules())
    graph = module.unload_surgery()
    assert not any(quantizing(m) for m in graph.modules())
    with torch.no_grad():
        assert relative_error(plain.eval().backbone(x), graph(x)) < 1e-5


def test_pt2e_qat_refuses_what_it_cannot_do(tmp_path):
    from callbacks.pruning import MagnitudePruning
    from callbacks.pruning_schedules import OneShot

    with pytest.raises(ValueError, match=r"int8_pt2e.*leave layers unset"):
        QuantizationAwareTraining("int8_pt2e", layers=["stages.*"])
    with pytest.raises(ValueError, match=r"MagnitudePruning's masking hooks do not run"):
        fit([MagnitudePruning(OneShot(0.5, at=1)), QuantizationAwareTraining("int8_pt2e")], tmp_path)
    from zoo.distillation.losses import FeatureHint

    module = cnn()
    module.add_loss(FeatureHint("stages.0", "stages.0"))  # reads a student layer the exported graph does not have
    trainer = Trainer(logger=False, callbacks=[QuantizationAwareTraining("int8_pt2e")], enable_progress_bar=False, max_steps=4,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"feature_hint.*distil logits only"):
        trainer.fit(module, Digits(batch_size=32))
