"""Pruning schedules and callbacks: formulas, amounts, structured shrinking, lottery tickets, resume, DDP, bad input,
the by-type report and the warning about untouched roles. Pruning EMoE models: tests/compose/test_prune_emoe.py."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks.pruning import LotteryTicket, MagnitudePruning, StructuredPruning, by_module_type, select_parameters, untouched_roles
from callbacks.pruning_schedules import Cubic, Exponential, Linear, OneShot, PruningSchedule
from datamodules import Digits
from datamodules.continual import ContinualDataModule
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_ddp
from zoo import Classifier, load_zoo_module
from zoo.continual import ER
from zoo.distillation import DistillationModule
from zoo.emoe import EMoEModule
from zoo.snnet import SNNetModule
from zoo.subtuning import SubTuningModule


def tiny_vit(**kwargs) -> Classifier:
    return Classifier(TINY_VIT, num_classes=10, model_kwargs={**TINY_VIT_KWARGS, **kwargs})


def fit(module, callbacks, max_steps, data=None, **kwargs) -> Trainer:
    trainer = Trainer(max_steps=max_steps, logger=kwargs.pop("logger", False), enable_checkpointing=kwargs.pop("enable_checkpointing", False), callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu", **kwargs)
    trainer.fit(module, data or Digits(batch_size=32))
    return trainer


# -- schedules -------------------------------------------------------------------------------------

def test_schedules_follow_their_formulas():
    s_i, s_f, t0, t1, dt = 0.1, 0.8, 10, 50, 10
    formulas = {
        Linear: lambda p: s_i + (s_f - s_i) * p,
        Exponential: lambda p: 1 - (1 - s_i) * ((1 - s_f) / (1 - s_i)) ** p,
        Cubic: lambda p: s_f + (s_i - s_f) * (1 - p) ** 3,  # Zhu & Gupta (2017), eq. 1
    }
    for cls, formula in formulas.items():
        sched = cls(final_sparsity=s_f, initial_sparsity=s_i, start=t0, end=t1, frequency=dt)
        for t in range(0, 70):
            if t < t0:
                expected = 0.0
            else:
                t_k = min(t1, t0 + (t - t0) // dt * dt)  # the last pruning step
                expected = formula((t_k - t0) / (t1 - t0))
            assert sched(t) == pytest.approx(expected, abs=1e-12), (cls.__name__, t)
        assert [t for t in range(70) if sched.is_pruning_step(t)] == [10, 20, 30, 40, 50]
    cubic = Cubic(final_sparsity=0.9, start=0, end=100, frequency=10)
    assert cubic(0) == 0.0 and cubic(50) == pytest.approx(0.9 * (1 - 0.5**3)) and cubic(100) == cubic(1000) == pytest.approx(0.9)
    # Exponential keeps a constant fraction of the survivors at every pruning step.
    exp = Exponential(final_sparsity=1 - 0.5**4, initial_sparsity=0.5, start=10, end=40, frequency=10)
    assert [1 - exp(t) for t in (10, 20, 30, 40)] == pytest.approx([0.5, 0.25, 0.125, 0.0625])
    one = OneShot(final_sparsity=0.6, at=7, interval="epoch")
    assert [one(t) for t in (0, 6, 7, 100)] == [0.0, 0.0, 0.6, 0.6] and one.interval == "epoch"
    # the schedule end is reached even when (end - start) is not a multiple of the frequency
    assert Linear(0.5, start=0, end=25, frequency=10)(25) == 0.5 and Linear(0.5, start=0, end=25, frequency=10)(24) == pytest.approx(0.4)


def test_schedule_subclass():
    class Step(PruningSchedule):
        def curve(self, p):
            return self.final_sparsity if p >= 0.5 else 0.0

    sched = Step(final_sparsity=0.4, start=0, end=10, frequency=5)
    assert [sched(t) for t in (0, 4, 5, 10)] == [0.0, 0.0, 0.4, 0.4]


@pytest.mark.parametrize("kwargs, match", [
    ({"final_sparsity": 1.0}, r"final_sparsity=1.0 is outside \[0, 1\)"),
    ({"final_sparsity": -0.1}, r"final_sparsity=-0.1 is outside"),
    ({"start": 100, "end": 10}, r"end=10 precedes start=100"),
    ({"frequency": 0}, r"frequency=0"),
    ({"initial_sparsity": 0.9, "final_sparsity": 0.5}, r"initial_sparsity=0.9 exceeds"),
    ({"interval": "batch"}, r"interval='batch'"),
])
def test_schedule_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Cubic(**kwargs)


# -- unstructured magnitude pruning ----------------------------------------------------------------

def test_global_vs_per_layer_amounts():
    torch.manual_seed(0)
    for global_pruning in (True, False):
        module = tiny_vit()
        cb = MagnitudePruning(OneShot(0.6), patterns=["backbone.blocks.*.mlp.fc*"], global_pruning=global_pruning)
        cb.select(module)
        assert cb.targets == [f"backbone.blocks.{i}.mlp.fc{j}.weight" for i in (0, 1) for j in (1, 2)]  # biases stay dense
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        cb.compute_masks(module, 0.6, None)
        masks = cb.masks(module)
        assert sorted(masks) == sorted(cb.targets)
        if global_pruning:  # reference: one threshold over all chosen weights
            scores = torch.cat([before[n].abs().flatten() for n in cb.targets])
            k = round(0.6 * scores.numel())
            threshold = scores.kthvalue(k).values
            for n in cb.targets:
                assert torch.equal(masks[n].bool(), before[n].abs() > threshold), n
            per_layer = [1 - masks[n].mean().item() for n in cb.targets]
            assert max(per_layer) - min(per_layer) > 0.01  # layers end up with different sparsities
        else:  # reference: the same fraction, by magnitude, in each layer
            for n in cb.targets:
                k = round(0.6 * before[n].numel())
                assert torch.equal(masks[n].bool(), before[n].abs() > before[n].abs().flatten().kthvalue(k).values), n
        for n, p in module.named_parameters():  # nothing else is touched
            base = n.removesuffix("_orig")
            if base not in cb.targets:
                assert torch.equal(p, before[base]), n


def test_second_step_ranks_current_weights_not_last_forward():
    """The weights move after the last forward (an optimizer step): a pruning step ranks them as they are now,
    as a run resumed from a checkpoint (which has had no forward yet) does."""
    for global_pruning in (True, False):
        torch.manual_seed(0)
        module = tiny_vit()
        cb = MagnitudePruning(OneShot(0.6), patterns=["backbone.blocks.*.mlp.fc*"], global_pruning=global_pruning)
        cb.select(module)
        cb.compute_masks(module, 0.3, None)
        module(torch.randn(2, 1, 8, 8))  # the forward pre-hooks set `weight` from weight_orig
        orig = dict(module.named_parameters())
        with torch.no_grad():  # an optimizer step: weight_orig moves, `weight` keeps the last forward's value
            for n in cb.targets:
                orig[n + "_orig"].mul_(torch.rand_like(orig[n + "_orig"]) * 4)
        current = {n: (orig[n + "_orig"] * m).detach().clone() for n, m in cb.masks(module).items()}
        cb.compute_masks(module, 0.6, None)
        masks = cb.masks(module)
        groups = [cb.targets] if global_pruning else [[n] for n in cb.targets]
        for group in groups:  # reference: the smallest magnitudes of the current masked weights are pruned
            scores = torch.cat([current[n].abs().flatten() for n in group])
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep[scores.topk(round(0.6 * scores.numel()), largest=False).indices] = False
            assert torch.equal(torch.cat([masks[n].bool().flatten() for n in group]), keep), group


def test_measured_equals_scheduled_and_figures(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    module = tiny_vit()
    sched = Cubic(final_sparsity=0.8, start=1, end=9, frequency=2)
    cb = MagnitudePruning(sched, patterns=["backbone.blocks.*"])
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(module, [cb], max_steps=12, logger=logger)
    sizes = [module.get_parameter(t).numel() for t in cb.targets]
    n = sum(sizes)
    assert [h[0] for h in cb.history] == [3, 5, 7, 9]  # step 1 is the start, at initial_sparsity=0
    for step, scheduled, measured in cb.history:
        assert scheduled == sched(step)
        assert measured == sum(round(scheduled * k) for k in sizes) / n  # per layer (the default), exact up to rounding
    # make_permanent: a plain model (no masks, no hooks) with the final sparsity baked in
    assert not cb.masks(module) and not any(n.endswith("_orig") for n, _ in module.named_parameters())
    for t, k in zip(cb.targets, sizes):
        assert int((module.get_parameter(t) == 0).sum()) == round(0.8 * k), t
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert {"pruning/sparsity_schedule", "pruning/final_layer_sparsity"} <= set(events.Tags()["images"])
    assert [e.value for e in events.Scalars("pruning/measured")] == pytest.approx([h[2] for h in cb.history])


def test_bad_patterns_fail_before_training():
    module = tiny_vit()
    with pytest.raises(ValueError, match=r"'backbone.blocks.\*.mlp.fc9\*' matches no parameter.*candidates: .*backbone\.blocks\.\d\.mlp\.fc\d\."):
        select_parameters(module, ["backbone.blocks.*.mlp.fc9*"])
    module.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        select_parameters(module, ["backbone.*"])
    assert select_parameters(module, ["backbone.blocks.0.mlp.fc1.*"], include_frozen=True) == ["backbone.blocks.0.mlp.fc1.weight"]

    class Fail(Callback):
        def on_train_batch_start(self, *args):
            raise AssertionError("training started")

    with pytest.raises(ValueError, match="matches no parameter"):
        fit(tiny_vit(), [MagnitudePruning(OneShot(0.5), patterns=["blocks.*"]), Fail()], max_steps=1)
    with pytest.raises(ValueError, match="ignore pattern 'classifier' matches no module"):
        fit(tiny_vit(), [StructuredPruning(OneShot(0.5), ignore=["classifier"]), Fail()], max_steps=1)
    with pytest.raises(ValueError, match=r"rewind_step=5 must be in \[0, round_steps=5\)"):
        LotteryTicket(rounds=2, rate=0.2, round_steps=5, rewind_step=5)
    with pytest.raises(ValueError, match=r"rate=1.0"):
        LotteryTicket(rate=1.0)


def test_report_by_module_type_and_warning_for_an_untouched_role(caplog):
    module = tiny_vit()
    cb = MagnitudePruning(OneShot(0.5))
    with caplog.at_level("INFO"):
        cb.report(module, cb.select(module))
    # per block qkv, proj, fc1, fc2 (width 32, FFN 64), the head; the patch embedding's kernel
    assert by_module_type(module, cb.targets) == {"Linear": (9, 2 * (96 * 32 + 32 * 32 + 64 * 32 + 32 * 64) + 10 * 32), "Conv2d": (1, 32 * 4)}
    assert "MagnitudePruning prunes 10 tensors (16,832 parameters)" in caplog.text and not cb.untouched
    attention_only = MagnitudePruning(OneShot(0.5), patterns=["backbone.blocks.*.attn.*"])
    with pytest.warns(UserWarning, match="leaves every ffn module of backbone unpruned"):
        attention_only.report(module, attention_only.select(module))
    assert attention_only.untouched == {"backbone": ["ffn", "outside"]}
    assert untouched_roles(module, select_parameters(module, ["backbone.*"])) == {}


# -- structured pruning ----------------------------------------------------------------------------

def test_structured_pruning_shrinks_vit_and_convnet():
    seed_everything(0)
    # ViT: whole heads (4 -> 2) and FFN neurons (64 -> 32); the embedding width is kept.
    module = tiny_vit(num_heads=4)
    cb = StructuredPruning(Linear(0.5, start=0, end=4, frequency=2), ignore=["head", "backbone.patch_embed.proj"], make_permanent=False)
    fit(module, [cb], max_steps=5)
    assert [(h[1], h[2]) for h in cb.history] == [(0.25, 0.25), (0.5, 0.5)]
    module.eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        masked = module(x)
    dense_params = sum(p.numel() for p in module.parameters())
    cb.remove_masks(module)
    cb.shrink(module, cb.applied, x[:1])
    with torch.no_grad():
        shrunk = module(x)
    assert shrunk.shape == (6, 10)
    torch.testing.assert_close(shrunk, masked, atol=1e-5, rtol=1e-5)
    d, h = 32, 64  # per block: qkv loses 2 heads x 3 x 8 rows (+bias), proj 16 inputs, fc1 32 rows (+bias), fc2 32 inputs
    removed = 2 * ((3 * 16) * (d + 1) + 16 * d + (h // 2) * (d + 1) + (h // 2) * d)
    assert sum(p.numel() for p in module.parameters()) == dense_params - removed
    for block in module.backbone.blocks:
        assert block.attn.num_heads == 2 and block.attn.qkv.out_features == 48 and block.mlp.fc1.out_features == 32

    # CNN: half the channels of every conv; at the end of fit the model is physically smaller.
    module = Classifier("zoo/convnet", num_classes=10, model_kwargs={"widths": (8, 16)})
    cb = StructuredPruning(OneShot(0.5, at=1), ignore=["head"])
    fit(module, [cb], max_steps=3)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8] and convs[1].in_channels == 4 and module.head.in_features == 8
    expected = (1 * 9 * 4 + 2 * 4) + (4 * 9 * 8 + 2 * 8) + (8 * 10 + 10)
    assert sum(p.numel() for p in module.parameters()) == expected
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# -- lottery tickets -------------------------------------------------------------------------------

class Snapshot(Callback):
    """Saves the effective weights at the start of given steps (after the callbacks before it ran)."""

    def __init__(self, steps):
        self.steps, self.weights = steps, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and trainer.global_step not in self.weights:
            self.weights[trainer.global_step] = {n.removesuffix("_orig"): getattr(*_owner(pl_module, n)).detach().clone() for n in pl_module.state_dict() if n.endswith(".weight") or n.endswith("_orig")}


def _owner(module, name):
    owner, _, attr = name.removesuffix("_orig").rpartition(".")
    return module.get_submodule(owner), attr


def test_lottery_ticket_rewinds_to_step_k():
    seed_everything(0)
    module = tiny_vit()
    lt = LotteryTicket(rounds=2, rate=0.5, round_steps=3, rewind_step=1, patterns=["backbone.blocks.*"], global_pruning=False, make_permanent=False)
    snap = Snapshot({1, 3, 6})
    fit(module, [lt, snap], max_steps=7)
    assert [h[0] for h in lt.history] == [3, 6]
    assert [h[1] for h in lt.history] == pytest.approx([0.5, 0.75])  # 1 - (1 - rate)^round
    masks = lt.masks(module)
    for name in lt.targets:
        saved = snap.weights[1][name]  # the weights at step k
        torch.testing.assert_close(lt.rewind_weights[name], saved, rtol=0, atol=0)
        after_round2 = snap.weights[6][name]
        keep = masks[name].bool()
        assert torch.equal(after_round2[keep], saved[keep]) and (after_round2[~keep] == 0).all()
        assert 1 - keep.float().mean().item() == pytest.approx(0.75, abs=1 / keep.numel())
    # the rest of the network (norms, embeddings, head) is rewound too
    for name in ("backbone.patch_embed.proj.weight", "head.weight"):
        torch.testing.assert_close(snap.weights[6][name], snap.weights[1][name], rtol=0, atol=0)


# -- checkpoints -----------------------------------------------------------------------------------

class MasksAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.masks = {n: m.clone() for n, m in MagnitudePruning.masks(pl_module).items()}


def test_resume_restores_masks_and_continues_schedule(tmp_path):
    seed_everything(0)
    sched = Linear(0.6, start=0, end=8, frequency=2)
    cb = MagnitudePruning(sched, patterns=["backbone.blocks.*"])
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    fit(tiny_vit(), [cb, ckpt], max_steps=9, enable_checkpointing=True)
    path = tmp_path / "step=4.ckpt"
    # the checkpoint holds plain weights (loadable without the callback) and the masks in the callback state
    plain = load_zoo_module(path)
    saved = torch.load(path, weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("MagnitudePruning"))
    assert state["applied"] == sched(2) and sorted(state["masks"]) == sorted(cb.targets)
    for name, mask in state["masks"].items():
        assert (plain.get_parameter(name)[~mask] == 0).all()

    resumed_cb = MagnitudePruning(sched, patterns=["backbone.blocks.*"])
    probe = MasksAtStart()
    module = tiny_vit()
    trainer = Trainer(max_steps=9, logger=False, enable_checkpointing=False, callbacks=[resumed_cb, probe], enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, Digits(batch_size=32), ckpt_path=path)
    assert sorted(probe.masks) == sorted(state["masks"])
    for name, mask in state["masks"].items():  # the same masks right after resuming
        assert torch.equal(probe.masks[name].bool(), mask)
    # the schedule continues at step 4 (not from 0) and reaches the same targets as the uninterrupted run
    assert [h[0] for h in resumed_cb.history] == [2, 4, 6, 8] == [h[0] for h in cb.history]
    assert [h[1] for h in resumed_cb.history] == [h[1] for h in cb.history]
    n = sum(module.get_parameter(t).numel() for t in resumed_cb.targets)
    assert sum(int((module.get_parameter(t) == 0).sum()) for t in resumed_cb.targets) == round(0.6 * n)


# -- DDP -------------------------------------------------------------------------------------------

DDP_CASES = {
    "magnitude": ({"class_path": "callbacks.pruning.MagnitudePruning", "init_args": {"patterns": ["backbone.blocks.*"], "make_permanent": False, "schedule": {
        "class_path": "callbacks.pruning_schedules.Cubic", "init_args": {"final_sparsity": 0.7, "start": 1, "end": 5, "frequency": 2}}}},
        {"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS}),
    "structured": ({"class_path": "callbacks.pruning.StructuredPruning", "init_args": {"schedule": {
        "class_path": "callbacks.pruning_schedules.Linear", "init_args": {"final_sparsity": 0.5, "start": 1, "end": 3, "frequency": 2}}}},
        {"model": "zoo/convnet", "model_kwargs": {"widths": [8, 16]}}),
}


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_ddp_masks_identical_on_every_rank(case, tmp_path):
    callback, model = DDP_CASES[case]
    config = {
        "trainer": {"max_steps": 6, "limit_val_batches": 0, "enable_progress_bar": False, "callbacks": [callback]},
        "model": {"class_path": "zoo.Classifier", "init_args": model},
        "data": {"class_path": "datamodules.Digits", "init_args": {"batch_size": 32}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    states = run_ddp([f"--config={path}", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], tmp_path / "out", cwd=tmp_path)
    assert sorted(states[0]["state_dict"]) == sorted(states[1]["state_dict"])
    for k, v in states[0]["state_dict"].items():  # same masks, same (pruned) weights on both ranks
        if "running_" in k:  # BatchNorm statistics of each rank's last batch (DDP broadcasts them before each forward)
            continue
        torch.testing.assert_close(v, states[1]["state_dict"][k], rtol=0, atol=0)
    if case == "magnitude":
        masks = {k: v for k, v in states[0]["state_dict"].items() if k.endswith("_mask")}
        assert len(masks) == 8
        for name, m in masks.items():  # every layer at 70 % (per-layer pruning, the default)
            assert int((m == 0).sum()) == round(0.7 * m.numel()), name
    else:  # both ranks shrank the convnet to half its channels
        state = states[0]["state_dict"]
        assert state["backbone.stages.0.0.weight"].shape[0] == 4 and state["backbone.stages.1.0.weight"].shape[:2] == (8, 4)
        assert state["head.weight"].shape == (10, 8)


# -- every zoo module ------------------------------------------------------------------------------

def _snnet():
    spec = lambda w: {"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": w}}  # noqa: E731
    return SNNetModule([spec(32), spec(16)], fulltune=False)  # anchors frozen: only stitching layers and heads train


ZOO_MODULES = {
    "snnet": _snnet,
    "subtuning": lambda: SubTuningModule(TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS, trainable_layers=["blocks.1"]),
    "emoe": lambda: EMoEModule(TINY_VIT, num_classes=10, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=8, top_k=2, layers=["*"], gate_noise=0.0),
    "distillation": lambda: DistillationModule(TINY_VIT, model_kwargs=TINY_VIT_KWARGS, teachers=[TINY_VIT], teacher_pretrained=False,
                                               teacher_model_kwargs=TINY_VIT_KWARGS, untrained_teacher_head=True),
    "continual": lambda: (ER("zoo/mlp", num_classes=10, model_kwargs={"in_chans": 1, "img_size": 8, "hidden": (32,)}, buffer_size=16),
                          ContinualDataModule(Digits(batch_size=32), classes_per_task=2)),
}


@pytest.mark.parametrize("name", list(ZOO_MODULES))
def test_magnitude_pruning_on_zoo_modules(name):
    seed_everything(0)
    module = ZOO_MODULES[name]()
    module, data = module if isinstance(module, tuple) else (module, Digits(batch_size=32))
    module.configure_model()  # the module's surgery (EMoE's experts), as the Trainer applies it
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    # the default selection: every weight matrix/kernel, and EMoE's stacked expert weights (not their stacked biases)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad and (p.ndim >= 2 and n.endswith(".weight") or n.endswith(("fc1_weight", "fc2_weight")))}
    assert (name == "emoe") == any(n.endswith("mlp.fc1_weight") for n in trainable)
    cb = MagnitudePruning(OneShot(0.5, at=1))
    stream = {"max_epochs": 5, "reload_dataloaders_every_n_epochs": 1} if name == "continual" else {}  # a stream of 5 tasks
    fit(module, [cb], max_steps=3, data=data, **stream)
    assert set(cb.targets) == trainable and cb.history and cb.history[0][2] == pytest.approx(0.5, abs=1e-3)
    params = dict(module.named_parameters())
    n = sum(params[t].numel() for t in cb.targets)
    assert sum(int((params[t] == 0).sum()) for t in cb.targets) == round(0.5 * n)
    assert not cb.untouched.get("backbone")  # the default selection reaches attention and FFNs (EMoE experts too)
    for k, v in frozen.items():  # frozen layers (SubTuning's prefix, a distillation teacher, SN-Net anchors) stay dense and unchanged
        assert torch.equal(params[k], v), k
