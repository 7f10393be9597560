"""callbacks.quantize: PTQ at the end of fit (then test evaluates the int8 model, which reloads), QAT's fake quantisation
only in its window, a resume mid-QAT equal to an uninterrupted run, composition with distillation and pruning, and the
bad inputs (unsupported layer, QAT after the last step, an empty calibration set) failing before training."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks.pruning import MagnitudePruning
from callbacks.pruning_schedules import OneShot
from callbacks.quantize import PostTrainingQuantization, QuantizationAwareTraining
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo import Classifier, load_zoo_module
from zoo.batch import as_batch
from zoo.quantize import Quantize, fake, get_scheme, select_layers

TOLERANCE = 0.03  # relative error of int8 logits (tests/zoo/test_quantize.py)


def tiny_vit(**kwargs) -> Classifier:
    return Classifier(TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS, **kwargs)


def trainer(callbacks, tmp_path, **kwargs) -> Trainer:
    kwargs = {"max_steps": 3, "limit_val_batches": 0, **kwargs}
    return Trainer(logger=False, enable_checkpointing=kwargs.pop("enable_checkpointing", False), callbacks=callbacks, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, **kwargs)


class Steps(Callback):
    """Counts the training steps run (bad inputs must fail before the first)."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


def test_ptq_after_fit_then_test_evaluates_the_int8_model_which_reloads(tmp_path):
    seed_everything(0)
    module, data = tiny_vit(), Digits(batch_size=32)
    cb = PostTrainingQuantization("int8_dynamic", calibration_batches=2)
    t = trainer([cb], tmp_path)
    t.fit(module, data)
    from torchao.quantization import Int8Tensor

    assert all(isinstance(m.weight, Int8Tensor) for m in module.backbone.modules() if isinstance(m, nn.Linear))
    assert 0 < cb.report.logit_rel_error < TOLERANCE and cb.report.layers == 8
    assert cb.path == str(tmp_path / "quantized.ckpt")
    acc = t.test(module, data, verbose=False)[0]["test/acc"]
    loaded = load_zoo_module(cb.path).eval()
    module.eval()
    hits = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch = as_batch(batch).ready()
            out = loaded(batch.inputs)
            assert torch.equal(out, module(batch.inputs))  # the reloaded int8 model is the in-memory one
            hits, total = hits + int((out.argmax(-1) == batch.targets).sum()), total + len(batch)
    assert acc == pytest.approx(hits / total)  # trainer.test evaluated the int8 model
    # Lightning's own loading (zoo test --ckpt_path quantized.ckpt): the checkpoint holds plain tensors, and the
    # module built with the checkpoint's surgery is int8 again; the callback leaves an int8 module alone
    again = PostTrainingQuantization(save_to="again.ckpt")
    reloaded = tiny_vit(surgery=[Quantize("int8_dynamic")])
    assert trainer([again], tmp_path).test(reloaded, data, ckpt_path=cb.path, verbose=False)[0]["test/acc"] == acc
    assert again.report is None and not (tmp_path / "again.ckpt").exists()


def test_ptq_in_test_quantises_a_float_checkpoint(tmp_path):
    seed_everything(0)
    module, data = tiny_vit(), Digits(batch_size=32)
    t = trainer([], tmp_path, max_steps=1)
    t.fit(module, data)
    t.save_checkpoint(tmp_path / "float.ckpt")
    cb = PostTrainingQuantization("int8_weight_only", calibration_batches=1)
    fresh = tiny_vit()
    trainer([cb], tmp_path).test(fresh, data, ckpt_path=tmp_path / "float.ckpt", verbose=False)  # `zoo test` as the quantise step
    assert cb.report.layers == 8 and hasattr(fresh.backbone.blocks[0].attn.qkv.weight, "qdata")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_zoo_module(cb.path).eval()(x), fresh.eval()(x))


def test_ptq_bad_inputs_fail_before_training(tmp_path):
    steps = Steps()
    with pytest.raises(ValueError, match=r"'patch_embed.proj' is a torch.nn.modules.conv.Conv2d"):
        trainer([PostTrainingQuantization(layers=["*"]), steps], tmp_path).fit(tiny_vit(), Digits(batch_size=32))
    with pytest.raises(ValueError, match=r"calibration set \(val split\) has 0 batches.*calibration_split to one of train"):
        trainer([PostTrainingQuantization(calibration_split="val"), steps], tmp_path).fit(tiny_vit(), Digits(batch_size=32, val_fraction=0.0))
    assert steps.steps == 0
    with pytest.raises(ValueError, match="calibration_batches=0"):
        PostTrainingQuantization(calibration_batches=0)


class FakeQuantSeen(Callback):
    """Records, per training step, whether fc1 of block 0 computed a fake-quantised output in that step's forward."""

    def __init__(self):
        self.seen: dict[int, bool] = {}
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        if not hasattr(self, "handle"):
            def check(m, args, out):
                if m.training:
                    self.seen[self.step] = not torch.allclose(out, nn.functional.linear(args[0], m.weight, m.bias))
            self.handle = pl_module.backbone.blocks[0].mlp.fc1.register_forward_hook(check)


def test_qat_fake_quant_only_in_the_scheduled_window(tmp_path):
    seed_everything(0)
    module, probe = tiny_vit(), FakeQuantSeen()
    cb = QuantizationAwareTraining("int8_dynamic", start_step=2, end_step=4, convert=False)
    trainer([cb, probe], tmp_path, max_steps=6).fit(module, Digits(batch_size=32))
    assert probe.seen == {0: False, 1: False, 2: True, 3: True, 4: False, 5: False}
    assert cb.active_steps == [2, 3]
    assert not fake.fake_layers(module) and all(type(m) is nn.Linear for m in module.backbone.modules() if isinstance(m, nn.Linear))


class FakeQuantOutputs(Callback):
    """Listed before QAT: at fit end, before QAT converts, each fake-quantised layer's input and output on ``x``
    (quantizers as the last step left them, frozen scales in use), the outputs again with torchao's asymmetric per-token
    activation fake quant (what QAT of int8_dynamic simulated before), and the whole model's logits."""

    def __init__(self, x):
        self.x, self.inputs, self.outputs, self.asymmetric = x, {}, {}, {}

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        pl_module.eval()
        layers = fake.fake_layers(pl_module.backbone)
        hooks = [m.register_forward_hook(lambda m, args, out, n=n: self.inputs.__setitem__(n, args[0])) for n, m in layers.items()]
        self.logits = pl_module(self.x)
        for h in hooks:
            h.remove()
        self.outputs = {n: m(self.inputs[n]) for n, m in layers.items()}
        old = fake.fake_quantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
        for n, m in layers.items():
            if m.activation_fake_quantizer is not None:
                kept, m.activation_fake_quantizer = m.activation_fake_quantizer, old
                self.asymmetric[n] = m(self.inputs[n])
                m.activation_fake_quantizer = kept


# Each int8 layer's output within this relative error of its fake-quantised output on the same input at the end of QAT
# (measured <= 2e-7: float vs int32 summation order); torchao's asymmetric activation simulation is ~5e-3 away. Whole
# logits only agree to ~1e-3: a token's largest negative activation sits exactly on a rounding tie (-127.5 with scale
# absmax / 127.5), so one-ulp differences upstream flip it between -128 and -127 in either model.
FIDELITY = 1e-5


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only"])
def test_qat_fake_quant_layers_compute_what_the_converted_int8_layers_compute(scheme, tmp_path):
    from zoo.quantize import relative_error

    seed_everything(0)
    x = torch.randn(16, 1, 8, 8)
    module, probe = tiny_vit(), FakeQuantOutputs(x)
    qat = QuantizationAwareTraining(scheme, start_step=0, freeze_step=1, save_to=None)  # weights move on after the freeze
    trainer([probe, qat], tmp_path, max_steps=3).fit(module, Digits(batch_size=32))
    assert len(probe.outputs) == 8 and hasattr(module.backbone.blocks[0].mlp.fc1.weight, "qdata")
    with torch.no_grad():
        errors = {n: relative_error(out, module.backbone.get_submodule(n)(probe.inputs[n])) for n, out in probe.outputs.items()}
        asymmetric = {n: relative_error(out, module.backbone.get_submodule(n)(probe.inputs[n])) for n, out in probe.asymmetric.items()}
        logits = relative_error(probe.logits, module.eval()(x))
    assert max(errors.values()) < FIDELITY and logits < 3e-3
    if scheme == "int8_dynamic":
        assert len(asymmetric) == 8 and min(asymmetric.values()) > 100 * FIDELITY  # the old simulation fails the check


def test_qat_start_after_the_last_step_fails_before_training(tmp_path):
    steps = Steps()
    with pytest.raises(ValueError, match=r"start_step=3 is at or after the run's last step: the run trains 3 steps \(max_steps=3\)"):
        trainer([QuantizationAwareTraining(start_step=3), steps], tmp_path, max_steps=3).fit(tiny_vit(), Digits(batch_size=32))
    with pytest.raises(ValueError, match=r"start_step=5 .* the run trains 4 steps \(max_epochs=2 x 2 batches\)"):
        trainer([QuantizationAwareTraining(start_step=5), steps], tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=2).fit(tiny_vit(), Digits(batch_size=32))
    assert steps.steps == 0
    with pytest.raises(ValueError, match="freeze_step=1: expected a step in the fake-quant window"):
        QuantizationAwareTraining(start_step=2, freeze_step=1)
    with pytest.raises(ValueError, match="scheme='int8_static'.*int8_weight_only, int8_dynamic"):
        QuantizationAwareTraining("int8_static")


def test_qat_resumed_mid_qat_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    def qat():
        return QuantizationAwareTraining("int8_dynamic", start_step=1, freeze_step=2, convert=False)

    def run(ckpt_path=None, callbacks=()):
        seed_everything(0)
        module = tiny_vit()
        # max_epochs too: estimated_stepping_batches then reads the train loader (it must keep the checkpoint's loader state)
        trainer([qat() if not callbacks else callbacks[0], *callbacks[1:]], tmp_path, max_steps=6, max_epochs=2, enable_checkpointing=bool(callbacks)
                ).fit(module, Digits(batch_size=32), ckpt_path=ckpt_path)
        return module.state_dict()

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    whole = run(callbacks=(qat(), ckpt))
    path = tmp_path / "ckpt" / "step=3.ckpt"
    saved = torch.load(path, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("QuantizationAwareTraining"))
    assert sorted(state["frozen"]) == sorted(select_layers(tiny_vit().backbone, get_scheme("int8_dynamic")))  # every layer's frozen scale
    resumed = run(ckpt_path=path)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the frozen scales matter: a resume that forgets them (freezes again at step 3) trains different weights
    monkeypatch.setattr(QuantizationAwareTraining, "load_state_dict", lambda self, state: None)
    forgetful = run(ckpt_path=path)
    assert not all(torch.equal(whole[k], forgetful[k]) for k in whole)


def test_qat_composes_with_distillation_and_pruning(tmp_path):
    from zoo.distillation import FeatureHint, SoftTargetKL, pool_of
    from zoo.losses import CrossEntropy

    seed_everything(0)
    teacher = {"model": TINY_VIT, "pretrained": False, "untrained_head": True, "model_kwargs": TINY_VIT_KWARGS}
    module = tiny_vit(losses=[CrossEntropy(weight=0.5), SoftTargetKL(weight=0.5, teacher=teacher),
                              FeatureHint("blocks.0.mlp.fc1", "blocks.0.mlp.fc1", weight=0.1, teacher=teacher)])
    pruning = MagnitudePruning(OneShot(0.5, at=1), patterns=["backbone.blocks.*"])
    qat = QuantizationAwareTraining("int8_weight_only", start_step=0)
    t = trainer([pruning, qat], tmp_path, max_steps=3)
    t.fit(module, Digits(batch_size=32))
    (model,) = [x.model for x in pool_of(module).teachers.values()]
    assert not fake.fake_layers(model) and all(not hasattr(p, "qdata") for p in model.parameters())  # the teacher stayed float
    assert {"train/soft_target_kl", "train/feature_hint"} <= set(t.logged_metrics)
    fc1 = module.backbone.blocks[0].mlp.fc1.weight
    assert hasattr(fc1, "qdata") and (fc1.qdata == 0).float().mean() >= 0.5  # int8, with the pruned half still zero
    assert qat.report.logit_rel_error < TOLERANCE
    with pytest.raises(ValueError, match="MagnitudePruning comes after QuantizationAwareTraining in the callbacks"):
        trainer([QuantizationAwareTraining(), MagnitudePruning(OneShot(0.5, at=1))], tmp_path).fit(tiny_vit(), Digits(batch_size=32))


class ConvThenLinear(nn.Module):
    """A backbone with BatchNorm and a Linear (a hybrid): conv-BN-ReLU, then a Linear on the pooled features."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.proj = nn.Linear(16, 6)

    def forward(self, x):
        return self.proj(self.stem(x))


class BNStats(Callback):
    def __init__(self):
        self.means = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.means[trainer.global_step] = pl_module.backbone.stem[1].running_mean.clone()


def test_qat_freezes_batchnorm_statistics_then_folds_them(tmp_path):
    seed_everything(0)
    module = Classifier(None, num_classes=10)
    module.backbone, module.head = ConvThenLinear(), nn.Linear(6, 10)
    stats = BNStats()
    qat = QuantizationAwareTraining("int8_dynamic", start_step=0, bn_freeze_step=2, save_to=None)
    trainer([qat, stats], tmp_path, max_steps=4).fit(module, Digits(batch_size=32))
    assert not torch.equal(stats.means[1], stats.means[2])  # step 1 still updates the statistics
    assert torch.equal(stats.means[2], stats.means[3]) and torch.equal(stats.means[3], stats.means[4])  # frozen from step 2
    bn = module.backbone.stem[1]
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.allclose(bn.running_var + bn.eps, torch.ones(4))  # folded
    assert hasattr(module.backbone.proj.weight, "qdata") and qat.report.logit_rel_error < TOLERANCE
    with pytest.raises(ValueError, match="bn_freeze_step=1: VisionTransformer has no BatchNorm layer"):
        trainer([QuantizationAwareTraining(bn_freeze_step=1)], tmp_path).fit(tiny_vit(), Digits(batch_size=32))


def test_ptq_prepares_with_splitquant_after_training_and_the_int8_split_model_reloads(tmp_path):
    from zoo.quantize.splitquant import SplitQuant

    seed_everything(0)
    module, data = tiny_vit(), Digits(batch_size=32)
    cb = PostTrainingQuantization("int8_dynamic", calibration_batches=2, prepare=[SplitQuant(layers=["blocks.*.mlp.*"], min_peak_ratio=0.0)])
    trainer([cb], tmp_path).fit(module, data)
    names = [type(t).__name__ for t in module.surgery]
    assert names[-2:] == ["SplitQuant", "Quantize"]  # split after training, then quantised; both in the hyperparameters
    split = [n for n, m in module.backbone.named_modules() if n.startswith("blocks.0.mlp.fc1.")]
    assert split, "the FFN layers were not split"
    loaded = load_zoo_module(cb.path).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))


def test_conversions_that_need_whole_weights_are_refused_under_sharding():
    """PTQ, QAT that converts and int8_pt2e QAT need whole weights: refused under sharding before training, naming the
    technique, the part and what works; QAT with ``convert: false`` trains sharded (tests/test_sharding.py, case qat)."""
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from zoo.sharding import check_strategy

    module = tiny_vit()
    for cb, part in ((PostTrainingQuantization(), "int8 conversion"), (QuantizationAwareTraining(), "int8 conversion"),
                     (QuantizationAwareTraining("int8_pt2e"), "torch.export")):
        check_strategy(module, DDPStrategy(), [cb])
        with pytest.raises(ValueError, match=rf"Classifier: {type(cb).__name__} cannot train under ModelParallelStrategy \(.*{part}"
                                             r".*Strategies that work: single device, DDP"):
            check_strategy(module, ModelParallelStrategy(), [cb])
    check_strategy(module, ModelParallelStrategy(), [QuantizationAwareTraining(convert=False)])
