"""Knowledge distillation: every loss against its formula, inert teachers, cached == online teacher, DDP, resume,
terms with their own teacher in a plain Classifier (one teacher run per step), bad inputs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_ddp
from zoo import Classifier
from zoo.backbones import build_backbone
from zoo.batch import Batch
from zoo.distillation import (
    AttentionDistill,
    DecoupledKD,
    DistillationModule,
    FeatureHint,
    HardCE,
    HiddenStateDistill,
    ModelOutputs,
    SoftTargetKL,
    Taps,
    Request,
    pool_of,
)
from zoo.losses import CrossEntropy, Step

STUDENT_KWARGS = {**TINY_VIT_KWARGS, "embed_dim": 16, "num_heads": 2, "depth": 1}


def trainer(tmp_path, **kw) -> Trainer:
    defaults = dict(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1, default_root_dir=str(tmp_path), limit_val_batches=0)
    return Trainer(**{**defaults, **kw})


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A tiny ViT Classifier trained a few steps on digits, saved as a zoo checkpoint."""
    tmp = tmp_path_factory.mktemp("teacher")
    seed_everything(0)
    teacher = Classifier(TINY_VIT, model_kwargs=TINY_VIT_KWARGS, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    t = trainer(tmp, max_steps=15)
    t.fit(teacher, Digits(batch_size=64))
    t.save_checkpoint(tmp / "teacher.ckpt")
    return str(tmp / "teacher.ckpt")


def outputs(**kw) -> ModelOutputs:
    return ModelOutputs(**kw)


def ce_step(logits, y) -> Step:
    """A training step of a module that masks nothing, for terms that read only the step's logits."""
    return Step(SimpleNamespace(mask_logits=lambda z, task: z), Batch(None, y), logits)


# -- every loss equals its formula --------------------------------------------------------------------------------


def softmax(z):
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def test_soft_target_kl_and_hard_ce_formulas():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64) * 3, torch.randint(0, 7, (5,))
    T = 3.0
    p_s, p_t = softmax(s / T), softmax(t / T)
    by_hand = T * T * sum((p_t[b] * (p_t[b].log() - p_s[b].log())).sum() for b in range(5)) / 5
    got = SoftTargetKL(temperature=T).distill(outputs(logits=s), [outputs(logits=t)], y)
    assert abs(got.item() - by_hand.item()) < 1e-6
    ce = -sum(softmax(s)[b, y[b]].log() for b in range(5)) / 5
    assert HardCE is CrossEntropy and abs(HardCE()(ce_step(s, y)).item() - ce.item()) < 1e-6  # the old name of the label term
    # several teachers: the term is averaged over them
    t2 = torch.randn(5, 7, dtype=torch.float64)
    kl = SoftTargetKL(temperature=T)
    both = kl.distill(outputs(logits=s), [outputs(logits=t), outputs(logits=t2)], y)
    assert torch.allclose(both, (kl.distill(outputs(logits=s), [outputs(logits=t)], y) + kl.distill(outputs(logits=s), [outputs(logits=t2)], y)) / 2)


def test_decoupled_kd_formula():
    torch.manual_seed(1)
    s, t, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64) * 2, torch.randint(0, 5, (6,))
    T, alpha, beta = 2.0, 0.7, 5.0
    total = 0.0
    for b in range(6):
        p_s, p_t = softmax(s[b] / T), softmax(t[b] / T)
        c = int(y[b])
        bs, bt = torch.stack([p_s[c], 1 - p_s[c]]), torch.stack([p_t[c], 1 - p_t[c]])
        tckd = (bt * (bt / bs).log()).sum()
        rest = [k for k in range(5) if k != c]
        qs, qt = p_s[rest] / p_s[rest].sum(), p_t[rest] / p_t[rest].sum()
        nckd = (qt * (qt / qs).log()).sum()
        total += alpha * tckd + beta * nckd
    by_hand = T * T * total / 6
    got = DecoupledKD(alpha=alpha, beta=beta, temperature=T).distill(outputs(logits=s), [outputs(logits=t)], y)
    assert abs(got.item() - by_hand.item()) < 1e-6
    # KD = TCKD + (1 - p_target_teacher) NCKD (Zhao et al., eq. 3): with one sample, beta = 1 - p_t recovers KD
    s1, t1, y1 = s[:1], t[:1], y[:1]
    p_nt = 1 - softmax(t1 / T)[0, y1[0]]
    dkd = DecoupledKD(alpha=1.0, beta=p_nt.item(), temperature=T).distill(outputs(logits=s1), [outputs(logits=t1)], y1)
    kd = SoftTargetKL(temperature=T).distill(outputs(logits=s1), [outputs(logits=t1)], y1)
    assert abs(dkd.item() - kd.item()) < 1e-9


def test_feature_hint_formula_and_projectors():
    torch.manual_seed(2)
    # tokens of different widths: a Linear on the last dim
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 12)
    hint = FeatureHint("a", "b")
    hint.build(outputs(features={"a": s}), outputs(features={"b": t}))
    assert isinstance(hint.projector, nn.Linear) and hint.projector.weight.shape == (12, 8)
    by_hand = ((s @ hint.projector.weight.T + hint.projector.bias - t) ** 2).mean()
    assert torch.allclose(hint.distill(outputs(features={"a": s}), [outputs(features={"b": t})], None), by_hand, atol=1e-6)
    # maps of different channel counts: a 1x1 conv
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    hint = FeatureHint("a", "b")
    hint.build(outputs(features={"a": s}), outputs(features={"b": t}))
    w, bias = hint.projector.weight[:, :, 0, 0], hint.projector.bias
    mapped = torch.einsum("oc,bchw->bohw", w, s) + bias[None, :, None, None]
    assert torch.allclose(hint.distill(outputs(features={"a": s}), [outputs(features={"b": t})], None), ((mapped - t) ** 2).mean(), atol=1e-6)
    # equal shapes: no projector, plain MSE
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    hint = FeatureHint("a", "b")
    hint.build(outputs(features={"a": s}), outputs(features={"b": t}))
    assert hint.projector is None and torch.allclose(hint.distill(outputs(features={"a": s}), [outputs(features={"b": t})], None), ((s - t) ** 2).mean())


def test_hidden_state_and_attention_formulas():
    torch.manual_seed(3)
    hs = {0: torch.randn(2, 4, 6), 2: torch.randn(2, 4, 6)}
    ht = {1: torch.randn(2, 4, 10), 3: torch.randn(2, 4, 6)}
    loss = HiddenStateDistill([[0, 1], [2, 3]])
    loss.build(outputs(hidden_states=hs), outputs(hidden_states=ht))
    p = loss.projectors["0_1"]
    assert "2_3" not in loss.projectors  # same width: no projector
    by_hand = (((hs[0] @ p.weight.T + p.bias) - ht[1]) ** 2).mean() / 2 + ((hs[2] - ht[3]) ** 2).mean() / 2
    assert torch.allclose(loss.distill(outputs(hidden_states=hs), [outputs(hidden_states=ht)], None), by_hand, atol=1e-6)

    a_s = {0: torch.randn(2, 2, 4, 4).softmax(-1)}
    a_t = {1: torch.randn(2, 3, 4, 4).softmax(-1)}  # head counts differ: both averaged over heads
    ms, mt = a_s[0].mean(1), a_t[1].mean(1)
    kl = (mt * (mt.log() - ms.log())).sum(-1).mean()
    got = AttentionDistill([[0, 1]]).distill(outputs(attentions=a_s), [outputs(attentions=a_t)], None)
    assert abs(got.item() - kl.item()) < 1e-6
    a_t_same = {1: torch.randn(2, 2, 4, 4).softmax(-1)}
    got = AttentionDistill([[0, 1]], mode="mse").distill(outputs(attentions=a_s), [outputs(attentions=a_t_same)], None)
    assert abs(got.item() - ((a_s[0] - a_t_same[1]) ** 2).mean().item()) < 1e-7


def test_taps_read_timm_and_hf_transformers():
    torch.manual_seed(4)
    vit = build_backbone(TINY_VIT, **TINY_VIT_KWARGS).eval()
    taps = Taps(vit, "student", Request(layers=["blocks.0.mlp"], hidden=[0, 2], attentions=[1]))
    x = torch.randn(2, 1, 8, 8)
    with taps.capture() as out:
        vit(x)
    h0 = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    h1 = vit.blocks[0](h0)
    assert torch.allclose(out.hidden_states[0], h0) and torch.allclose(out.hidden_states[2], vit.blocks[1](h1), atol=1e-6)
    attn = vit.blocks[1].attn
    qkv = attn.qkv(vit.blocks[1].norm1(out.hidden_states[0].new_tensor(h1))).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    by_hand = (qkv[0] * attn.scale @ qkv[1].transpose(-2, -1)).softmax(-1)
    assert torch.allclose(out.attentions[1], by_hand, atol=1e-6)
    assert out.features["blocks.0.mlp"].shape == (2, 17, 32)

    bert = build_backbone("hf/bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100).eval()
    taps = Taps(bert, "student", Request(hidden=[0, 2], attentions=[1]))
    inputs = {"input_ids": torch.randint(0, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with taps.capture() as out:
        bert(taps.prepare(inputs))
    ref = bert.model(**inputs, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(out.hidden_states[2], ref.hidden_states[2]) and torch.allclose(out.attentions[1], ref.attentions[1])
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(2, 2, 6), atol=1e-6)


# -- the module ----------------------------------------------------------------------------------------------------


def student(teacher_ckpt, **kw) -> DistillationModule:
    losses = kw.pop("losses", None) or [SoftTargetKL(weight=0.8), HardCE(weight=0.2), FeatureHint("blocks.0", "blocks.1", weight=0.5)]
    return DistillationModule(TINY_VIT, model_kwargs=STUDENT_KWARGS, teachers=[teacher_ckpt], losses=losses, **kw)


def test_teachers_inert_and_not_saved(teacher_ckpt, tmp_path):
    seed_everything(0)
    module = student(teacher_ckpt)
    before = {k: v.clone() for k, v in module.teachers.state_dict().items()}
    student_before = module.backbone.blocks[0].mlp.fc1.weight.clone()
    t = trainer(tmp_path, max_steps=4)
    t.fit(module, Digits(batch_size=32))
    assert all(torch.equal(before[k], v) for k, v in module.teachers.state_dict().items())  # bit-identical
    assert not torch.equal(student_before, module.backbone.blocks[0].mlp.fc1.weight)  # the student did learn
    assert not module.teachers.training and all(not p.requires_grad for p in module.teachers.parameters())
    in_opt = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in module.teachers.parameters()}
    assert {id(p) for p in module.losses[2].projector.parameters()} <= in_opt  # the FitNets projector is learned
    assert all(p.grad is None for p in module.teachers.parameters())
    t.save_checkpoint(tmp_path / "student.ckpt")
    ckpt = torch.load(tmp_path / "student.ckpt", weights_only=False)
    assert not any(k.startswith("teachers.") for k in ckpt["state_dict"]) and "losses.2.projector.weight" in ckpt["state_dict"]
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "student.ckpt")  # rebuilds the projector from its shape
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), module.eval()(x))
    assert torch.equal(loaded.losses[2].projector.weight, module.losses[2].projector.weight)
    alone = DistillationModule.load_from_checkpoint(tmp_path / "student.ckpt", teachers=[])  # the student without its teachers
    assert torch.equal(alone.eval()(x), module(x)) and not len(alone.teachers)
    assert "teachers.0.head.weight" in student(teacher_ckpt, save_teachers=True).state_dict()
    assert set(module._ddp_params_and_buffers_to_ignore) == {f"teachers.{k}" for k in module.teachers.state_dict()}


def student_outputs(module, x, layers) -> ModelOutputs:
    """The student's logits and the given backbone layers' outputs on ``x``, read by hand with Taps."""
    taps = Taps(module.backbone, "student", Request(layers=layers))
    with torch.no_grad(), taps.capture() as out:
        out.logits = module(x)
    return out


def test_cache_equals_online_teacher(teacher_ckpt, tmp_path):
    seed_everything(0)
    module = student(teacher_ckpt, cache_teacher=True, cache_dir=str(tmp_path / "cache"))
    dm = Digits(batch_size=32, with_index=True)
    trainer(tmp_path, max_steps=2).fit(module, dm)
    assert pool_of(module).teachers[0].cache is not None
    batch = dm.collate_fn([dm.train_set[i] for i in range(len(dm.train_set))])
    x, y, idx = batch.inputs, batch.targets, batch.index
    assert torch.equal(idx, torch.arange(len(x)))
    module.eval()
    online = module.teacher_outputs(x)[0]
    cached = module.cached_teacher_outputs(idx)[0]
    assert torch.allclose(cached.logits, online.logits, atol=1e-6)
    assert torch.allclose(cached.features["blocks.1"], online.features["blocks.1"], atol=1e-6)
    s = student_outputs(module, x, ["blocks.0"])
    for term in module.losses:
        if isinstance(term, (SoftTargetKL, FeatureHint)):
            assert abs(term.distill(s, [cached], y).item() - term.distill(s, [online], y).item()) < 1e-6
    # a second run with the same teacher and data reuses the files
    again = student(teacher_ckpt, cache_teacher=True, cache_dir=str(tmp_path / "cache"))
    trainer(tmp_path, max_steps=1).fit(again, Digits(batch_size=32, with_index=True))
    assert pool_of(again).teachers[0].cache.directory == pool_of(module).teachers[0].cache.directory
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # batches without index: refused before training, saying what to set (the datamodule is not changed)
    plain = Digits(batch_size=32)
    t = trainer(tmp_path)
    with pytest.raises(ValueError, match="set `with_index: true` on the datamodule"):
        t.fit(student(teacher_ckpt, cache_teacher=True, cache_dir=str(tmp_path / "cache")), plain)
    assert t.global_step == 0 and not plain.with_index
    # a random training transform is refused unless approximate targets are accepted
    with pytest.raises(ValueError, match="approximate_cache_targets"):
        trainer(tmp_path).fit(student(teacher_ckpt, cache_teacher=True), Digits(batch_size=32, augment=True, with_index=True))
    ok = student(teacher_ckpt, cache_teacher=True, approximate_cache_targets=True, cache_dir=str(tmp_path / "approx"))
    trainer(tmp_path, max_steps=1).fit(ok, Digits(batch_size=32, augment=True, with_index=True))


def test_terms_with_their_own_teacher_in_a_plain_classifier(teacher_ckpt, tmp_path):
    """Two terms in a zoo.Classifier (as from YAML) name one teacher .ckpt: loaded once, run once per step, logged by name."""
    seed_everything(0)
    losses = [{"class_path": "zoo.losses.CrossEntropy", "init_args": {"weight": 0.2}},
              {"class_path": "zoo.distillation.SoftTargetKL", "init_args": {"weight": 0.8, "temperature": 2.0, "teacher": teacher_ckpt}},
              {"class_path": "zoo.distillation.FeatureHint", "init_args": {"student_layer": "blocks.0", "teacher_layer": "blocks.1", "teacher": teacher_ckpt}}]
    module = Classifier(TINY_VIT, model_kwargs=STUDENT_KWARGS, losses=losses)
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, Digits(batch_size=32))
    pool = pool_of(module)
    assert list(pool.teachers) == [teacher_ckpt] and pool.attached[module.losses[1]] == pool.attached[module.losses[2]] == [teacher_ckpt]
    teacher = pool.teachers[teacher_ckpt].model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in module.state_dict())  # outside the checkpoint (and DDP, the optimizer)
    assert {"train/cross_entropy", "train/soft_target_kl", "train/feature_hint"} <= set(t.logged_metrics)
    # one step by hand: the teacher runs once, and the total is the weighted sum of the terms against their formulas
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    module.train()
    dm = Digits(batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    step = Step(module, batch, module.batch_logits(batch))  # what Classifier.training_loss does (the module is still attached to its trainer)
    total, logits = sum(term.weight * term(step) for term in module.losses), step.logits
    handle.remove()
    assert calls == [1]
    with torch.no_grad():
        t_logits = teacher(batch.inputs)
    kd = SoftTargetKL(temperature=2.0).distill(outputs(logits=logits), [outputs(logits=t_logits)], batch.targets)
    module.eval()
    s = student_outputs(module, batch.inputs, ["blocks.0"])
    with Taps(teacher.backbone, "t", Request(layers=["blocks.1"])).capture() as t_out, torch.no_grad():
        teacher(batch.inputs)
    hint = torch.nn.functional.mse_loss(module.losses[2].projector(s.features["blocks.0"]), t_out.features["blocks.1"])
    by_hand = 0.2 * torch.nn.functional.cross_entropy(logits, batch.targets) + 0.8 * kd + hint
    assert torch.allclose(total.double(), by_hand.double(), atol=1e-5)
    with pytest.raises(ValueError, match="has no trained head"):
        headless = {"model": TINY_VIT, "pretrained": False, "model_kwargs": TINY_VIT_KWARGS}  # a backbone named by model: no trained head
        trainer(tmp_path).fit(Classifier(TINY_VIT, model_kwargs=STUDENT_KWARGS, losses=[SoftTargetKL(teacher=headless)]), Digits(batch_size=16))
    with pytest.raises(ValueError, match="teacher=null means every teacher of the module, and Classifier has none"):
        trainer(tmp_path).fit(Classifier(TINY_VIT, model_kwargs=STUDENT_KWARGS, losses=[SoftTargetKL()]), Digits(batch_size=16))


class CheckRestored(Callback):
    def __init__(self, ckpt):
        self.ckpt = ckpt

    def on_train_start(self, trainer, module):
        state = module.state_dict()
        assert set(state) == set(self.ckpt["state_dict"])
        assert all(torch.equal(state[k], v) for k, v in self.ckpt["state_dict"].items())
        live, saved = trainer.optimizers[0].state_dict(), self.ckpt["optimizer_states"][0]  # saved: keyed by name, in group order
        order = [(i, n) for gl, gs in zip(live["param_groups"], saved["param_groups"]) for i, n in zip(gl["params"], gs["params"])]
        assert len(order) == len(live["state"]) == len(saved["state"])
        assert all(torch.equal(live["state"][i]["exp_avg"], saved["state"][n]["exp_avg"]) for i, n in order)
        self.checked = True


def test_resume_restores_student_projector_and_optimizer(teacher_ckpt, tmp_path):
    seed_everything(0)
    t = trainer(tmp_path, max_steps=3)
    t.fit(student(teacher_ckpt), Digits(batch_size=32))
    t.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    check = CheckRestored(ckpt)
    resumed = trainer(tmp_path, max_steps=6, callbacks=[check])
    fresh = student(teacher_ckpt)
    resumed.fit(fresh, Digits(batch_size=32), ckpt_path=tmp_path / "mid.ckpt")
    assert check.checked and resumed.global_step == 6
    assert not torch.equal(fresh.losses[2].projector.weight, ckpt["state_dict"]["losses.2.projector.weight"])  # kept training


def test_ddp_with_cache(teacher_ckpt, tmp_path):
    config = {
        "model": {"class_path": "zoo.distillation.DistillationModule", "init_args": {
            "model": TINY_VIT, "model_kwargs": STUDENT_KWARGS, "teachers": [teacher_ckpt], "cache_teacher": True,
            "cache_dir": str(tmp_path / "cache"),
            "losses": [{"class_path": "zoo.distillation.DecoupledKD", "init_args": {"weight": 1.0}},
                       {"class_path": "zoo.distillation.FeatureHint", "init_args": {"student_layer": "blocks.0", "teacher_layer": "blocks.1"}}]}},
        "data": {"class_path": "datamodules.Digits", "init_args": {"batch_size": 32, "with_index": True}},
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    states = run_ddp([f"--config={tmp_path / 'c.yaml'}", "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                      "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}", "--seed_everything=0"], tmp_path / "out", cwd=tmp_path)
    a, b = (s["state_dict"] for s in states)
    assert states[0]["global_step"] == 3 and set(a) == set(b) and not any(k.startswith("teachers.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the student (and the projector) stayed in sync
    start = DistillationModule(TINY_VIT, model_kwargs=STUDENT_KWARGS, teachers=[teacher_ckpt], losses=[DecoupledKD()])
    assert not torch.equal(a["backbone.blocks.0.mlp.fc1.weight"], start.backbone.blocks[0].mlp.fc1.weight)
    # both ranks wrote their halves of the cache: every row equals the online teacher
    (cache,) = list((tmp_path / "cache").iterdir())
    dm = Digits(batch_size=32)
    dm.setup("fit")
    x = torch.stack([dm.train_set[i].inputs for i in range(len(dm.train_set))])
    with torch.no_grad():
        logits = start.teachers[0].eval()(x)
    assert np.allclose(np.load(cache / "t0_logits.npy"), logits.numpy(), atol=1e-5)
    assert np.load(cache / "t0_blocks.1.npy").shape == (len(x), 17, 32)


# -- bad inputs fail before training -------------------------------------------------------------------------------


def test_bad_inputs(teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="predicts 10 classes but the student has num_classes=5"):
        student(teacher_ckpt, num_classes=5)
    with pytest.raises(ValueError, match=r"'blocks\.7' does not exist.*Valid layer names: .*blocks\.0\.attn"):
        student(teacher_ckpt, losses=[FeatureHint("blocks.0", "blocks.7")])
    with pytest.raises(ValueError, match="no trained head"):
        DistillationModule("zoo/mlp", model_kwargs={"img_size": 8}, teachers=["zoo/mlp"], teacher_model_kwargs={"img_size": 8}, losses=[SoftTargetKL()])
    with pytest.raises(ValueError, match="hidden-state indices must be in 0..1"):
        student(teacher_ckpt, losses=[HiddenStateDistill([[3, 1]])])
    with pytest.raises(ValueError, match="needs a Hugging Face encoder .* or a timm ViT"):
        DistillationModule("zoo/convnet", model_kwargs={"widths": (8, 8)}, teachers=[teacher_ckpt], losses=[HiddenStateDistill([[1, 1]])])
    # ViT tokens (17, 32) cannot map onto a CNN map (8, 4, 4): refused in setup, before the first step
    module = DistillationModule("zoo/convnet", model_kwargs={"widths": (8,)}, teachers=[teacher_ckpt], losses=[FeatureHint("stages.0", "blocks.1")])
    t = trainer(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(8, 4, 4\) cannot be mapped onto teacher features of shape \(17, 32\)"):
        t.fit(module, Digits(batch_size=16))
    assert t.global_step == 0
    with pytest.raises(ValueError, match="temperature"):
        SoftTargetKL(temperature=0)
    assert math.isclose(SoftTargetKL(weight=0.3).weight, 0.3)
