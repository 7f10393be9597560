"""SubTuning: layer listing per family, freezing, no-grad prefix, cache, greedy selection, multi-task, DDP, resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from callbacks.skip_cached_inputs import SkipCachedInputs
from callbacks.subtuning_profile import SubTuningProfile
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_ddp
from zoo.backbones import build_backbone, load_zoo_module
from zoo.batch import Batch
from zoo.classifier import Classifier
from zoo.subtuning import Freeze, LayerChain, MultiTaskSubTuned, SubTuningModule, candidate_layers, greedy_select
from zoo.subtuning.profile import FULL, ProfileRunner, stack_dataset

VIT4 = {**TINY_VIT_KWARGS, "depth": 4}
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
HF_KW = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


def _family_cases():
    torch.manual_seed(0)
    text = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": MASK}
    return {
        "vit": (build_backbone(TINY_VIT, **TINY_VIT_KWARGS), torch.randn(3, 1, 8, 8), ["blocks.0", "blocks.1"], ["blocks.0", "blocks.1"]),
        "resnet": (build_backbone("timm/resnet10t", in_chans=1), torch.randn(3, 1, 32, 32), ["layer1.0", "layer2.0", "layer3.0", "layer4.0"], ["layer1", "layer2", "layer3", "layer4"]),
        "efficientnet": (
            build_backbone("timm/tf_efficientnet_lite0", in_chans=1), torch.randn(2, 1, 32, 32),
            [f"blocks.{i}.{j}" for i, n in enumerate([1, 2, 2, 3, 3, 4, 1]) for j in range(n)], [f"blocks.{i}" for i in range(7)],
        ),
        "bert": (build_backbone("hf/bert", **HF_KW), text, ["encoder.layer.0", "encoder.layer.1"], ["encoder.layer.0", "encoder.layer.1"]),
        "llama": (build_backbone("hf/llama", num_key_value_heads=2, **HF_KW), text, ["layers.0", "layers.1"], ["layers.0", "layers.1"]),
        "gpt2": (build_backbone("hf/gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0),
                 text, ["h.0", "h.1"], ["h.0", "h.1"]),
    }


def test_candidate_layers_and_split_forward_every_family():
    for family, (backbone, x, blocks, stages) in _family_cases().items():
        assert candidate_layers(backbone) == blocks, family
        assert candidate_layers(backbone, "stage") == stages, family
        backbone.eval()
        chain, ref = LayerChain(backbone), backbone(x)
        for start in range(len(chain) + 1):  # prefix up to any block + suffix from it == the whole model
            h, ctx = chain.prefix(x, start)
            assert torch.equal(chain.suffix(h, ctx, x, start), ref), (family, start)


def _vit(layers, **kw):
    torch.manual_seed(0)
    return SubTuningModule(TINY_VIT, num_classes=10, model_kwargs=VIT4, trainable_layers=layers, **kw)


def test_freezing_only_chosen_layers_change_and_prefix_has_no_graph():
    model = _vit(["blocks.1", 3])  # names or indices
    assert model.trainable_names == ["blocks.1", "blocks.3"] and model.hparams.trainable_layers == ["blocks.1", "blocks.3"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    model.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("b0", o.requires_grad))
    model.backbone.blocks[2].register_forward_hook(lambda m, i, o: seen.__setitem__("b2", o.requires_grad))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model.criterion(model(torch.randn(8, 1, 8, 8)), torch.arange(8))
    loss.backward()
    opt.step()
    assert seen == {"b0": False, "b2": True}  # frozen prefix without autograd; frozen block between trained ones with it
    for k, v in model.state_dict().items():
        trained = k.startswith(("head.", "backbone.blocks.1.", "backbone.blocks.3."))
        assert torch.equal(v, before[k]) != trained, k


def test_freeze_surgery_on_any_classifier_undo_and_preset():
    torch.manual_seed(0)
    model = Classifier(model=TINY_VIT, model_kwargs=VIT4, surgery=[Freeze(["blocks.2"])])
    model.backbone.blocks[0].attn.qkv.weight.requires_grad_(False)  # frozen before the surgery: frozen after its undo too
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.configure_model()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if n.startswith(("backbone.blocks.2.", "head."))}
    assert model.hparams.surgery == [{"class_path": "zoo.subtuning.layers.Freeze", "init_args": {
        "trainable_layers": ["blocks.2"], "granularity": "block", "cache_frozen_features": False, "checkpoint_feature_cache": True, "cache_device": "auto"}}]
    model.unload_surgery()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    preset = _vit(["blocks.2"])  # the preset is the same Freeze, applied when it is built
    assert {n for n, p in preset.named_parameters() if p.requires_grad} == {n for n in before if n.startswith(("backbone.blocks.2.", "head."))}
    assert preset.hparams.surgery == [] and isinstance(preset.surgery[0], Freeze)
    with pytest.raises(ValueError, match="leave Freeze out of `surgery`"):
        _vit([1], surgery=[Freeze([2])])


def test_frozen_batchnorm_stays_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = SubTuningModule("timm/resnet10t", num_classes=10, model_kwargs={"in_chans": 1}, trainable_layers=["layer4"], granularity="stage")
    model.train()
    assert not model.backbone.bn1.training and not model.backbone.layer3.training and model.backbone.layer4.training
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_mean" in k}
    trainer = Trainer(max_steps=3, val_check_interval=1, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Digits(samples_per_class=4, batch_size=8))  # validation in between toggles modes
    for k, v in model.backbone.state_dict().items():
        if "running_mean" in k:
            assert torch.equal(v, stats[k]) != k.startswith("layer4."), k


def test_cache_frozen_features_matches_fresh_prefix():
    model = _vit(["blocks.2"], cache_frozen_features=True).train()
    calls = []
    prefix = model.chain.prefix
    model.chain.prefix = lambda x, s: (calls.append(len(x)), prefix(x, s))[1]
    x, y, idx = torch.randn(6, 1, 8, 8), torch.arange(6), torch.tensor([5, 0, 9, 3, 1, 7])
    task = torch.zeros(6, dtype=torch.long)  # a continual batch: the task id is no index (it was read as one by position)
    loss1, logits1, _ = model.training_loss(Batch(x, y, index=idx, task=task))
    loss2, logits2, _ = model.training_loss(Batch(x[:3], y[:3], index=idx[:3]))  # all cached: no prefix call
    assert calls == [6]
    with torch.no_grad():
        fresh = prefix(x, model.start)[0]
    cache = model.caches["train"]
    assert torch.allclose(cache.values[idx], fresh, atol=1e-6) and cache.filled.sum() == 6
    model.training_loss(Batch(x[:2], y[:2], index=torch.tensor([5, 40])))  # one new sample, the cache grows
    assert calls == [6, 1] and cache.filled.sum() == 7 and cache.placeholder.shape == (1, 8, 8)
    assert torch.allclose(logits1, model(x), atol=1e-5) and torch.allclose(logits2, logits1[:3], atol=1e-6)
    assert len({tuple(r.tolist()) for r in logits1}) == 6  # six samples, six rows
    with pytest.raises(ValueError, match="needs the batch field 'index'.*with_index: true"):
        model.training_loss(Batch(x, y, task=task))  # no index: refused, naming the datamodule option


class CountLoads(Callback):
    """Counts the images the datamodule loads and the frozen-prefix calls, per epoch phase."""

    def __init__(self, dm):
        self.loads, self.prefix_calls, self.phases = [0], [0], []
        dm.setup("fit")
        source = dm.train_set.dataset  # Digits: one in-memory dataset behind train and val
        get = source.__getitem__
        dm.train_set.dataset = dm.val_set.dataset = type("Counted", (), {"__getitem__": lambda _, i: (self.loads.__setitem__(0, self.loads[0] + 1), get(i))[1]})()

    def on_fit_start(self, trainer, pl_module):
        if hasattr(pl_module, "chain"):
            prefix = pl_module.chain.prefix
            pl_module.chain.prefix = lambda x, s: (self.prefix_calls.__setitem__(0, self.prefix_calls[0] + 1), prefix(x, s))[1]

    def _mark(self, name):
        self.phases.append((name, self.loads[0], self.prefix_calls[0]))
        self.loads[0] = self.prefix_calls[0] = 0

    def on_validation_epoch_start(self, trainer, pl_module):
        self._mark("train")

    def on_validation_epoch_end(self, trainer, pl_module):
        self._mark("val")


def test_cached_epochs_skip_inputs_and_train_like_uncached(tmp_path):
    def fit(cache, skip=True):
        seed_everything(0)
        dm = Digits(samples_per_class=4, batch_size=16, val_fraction=0.05, with_index=True)
        counter = CountLoads(dm)
        callbacks = [counter, SkipCachedInputs()] if cache and skip else [counter]
        trainer = Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp_path)
        model = _vit(["blocks.2"], cache_frozen_features=cache)
        trainer.fit(model, datamodule=dm)
        return model, dm, counter, {k: trainer.callback_metrics[k].item() for k in ("val/acc", "val/loss")}

    cached, dm, counter, metrics = fit(True)
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    n_batches = -(-n_train // 16), -(-n_val // 16)
    # Epoch 1 loads every image and runs the prefix once per batch; later epochs neither load nor run it.
    assert counter.phases == [("train", n_train, n_batches[0]), ("val", n_val, n_batches[1])] + [("train", 0, 0), ("val", 0, 0)] * 2
    assert dm.train_set.cached is None and dm.val_set.cached is None  # every input loads again after fit
    # Without the callback the module leaves the datamodule alone: every epoch loads every input, the prefix runs once.
    _, _, loading, _ = fit(True, skip=False)
    assert loading.phases == [("train", n_train, n_batches[0]), ("val", n_val, n_batches[1])] + [("train", n_train, 0), ("val", n_val, 0)] * 2
    with pytest.raises(ValueError, match="SkipCachedInputs .* caches none: set cache_frozen_features: true"):
        Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[SkipCachedInputs()]).fit(_vit([1]), datamodule=Digits(samples_per_class=2))
    plain, _, _, plain_metrics = fit(False)
    for k, v in plain.state_dict().items():
        assert torch.allclose(v, cached.state_dict()[k], atol=1e-5), k
    assert metrics == pytest.approx(plain_metrics, abs=1e-5)


def test_cache_belongs_to_its_dataset(tmp_path):
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    model = _vit(["blocks.2"], cache_frozen_features=True)
    dm1, dm2 = (Digits(samples_per_class=4, batch_size=16, val_fraction=0.05, with_index=True, seed=s) for s in (0, 1))
    trainer = Trainer(max_epochs=1, **kw)
    trainer.fit(model, datamodule=dm1)
    got = trainer.validate(model, datamodule=dm2, verbose=False)[0]  # other samples at the same indices
    plain = _vit(["blocks.2"])
    plain.load_state_dict(model.state_dict())
    assert got == pytest.approx(Trainer(**kw).validate(plain, datamodule=dm2, verbose=False)[0], abs=1e-6)
    Trainer(max_epochs=1, **kw).fit(model, datamodule=dm2)  # a new fit on new data starts new caches
    assert model.caches["train"].source is dm2.train_set and model.caches["val0"].source is dm2.val_set
    dm2.val_set = dm2.train_set  # one dataset behind both loaders: one cache, so one mask fits both
    Trainer(max_epochs=2, limit_train_batches=1, **kw).fit(model, datamodule=dm2)
    assert model.caches["train"] is model.caches["val0"] and model.caches["val0"].source is dm2.train_set


@pytest.mark.parametrize("dm_kwargs, match", [({"augment": True, "with_index": True}, "deterministic_train_transform"), ({}, "with_index")])
def test_cache_refused_before_training(tmp_path, dm_kwargs, match):
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        trainer.fit(_vit([1], cache_frozen_features=True), datamodule=Digits(samples_per_class=2, **dm_kwargs))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown layer 'blocks\.9'.*blocks\.0"):
        _vit(["blocks.9"])
    with pytest.raises(ValueError, match="out of range"):
        _vit([4])
    with pytest.raises(ValueError, match="twice"):
        _vit([1, "blocks.1"])
    with pytest.raises(ValueError, match="granularity"):
        _vit([1], granularity="layer")
    with pytest.raises(ValueError, match="does not know the layers of ConvNet"):
        SubTuningModule("zoo/convnet", trainable_layers=[0])
    with pytest.raises(ValueError, match="Hugging Face"):
        SubTuningModule("hf/bert", model_kwargs=HF_KW, trainable_layers=[1], cache_frozen_features=True)
    with pytest.raises(ValueError, match="start"):
        greedy_select(["a"], lambda s: 0.0, start="middle")
    with pytest.raises(ValueError, match="steps"):
        SubTuningProfile(steps=0)


def test_greedy_selection_known_answer():
    gain = {"a": 0.0625, "b": 0.25, "c": 0.125, "d": -0.125}  # exact in binary: ties are real ties

    def score(s):  # additive, with "c" useless once "b" is in
        return 0.5 + sum(gain[n] for n in s) - (0.125 if {"b", "c"} <= set(s) else 0.0)

    chosen, acc, history = greedy_select(list(gain), score, k=3, epsilon=0.01, start="head")
    assert chosen == ("a", "b") and acc == 0.8125
    assert history[0]["layers"] == () and {h["layers"] for h in history if h["round"] == 1} == {("a",), ("b",), ("c",), ("d",)}
    assert greedy_select(list(gain), score, k=1, start="head")[0] == ("b",)
    assert greedy_select(list(gain), score, start="best", profile={n: score((n,)) for n in gain})[0] == ("a", "b")
    # From all layers, removing: drop "d", then "c" (the two that hurt), then stop (removing more hurts by > epsilon).
    chosen, acc, _ = greedy_select(list(gain), score, start="all", epsilon=0.01)
    assert chosen == ("a", "b")
    # epsilon lets the search keep going through a small dip but returns the best set seen
    flat = {(): 0.5, ("a",): 0.495, ("a", "b"): 0.9}
    chosen, _, _ = greedy_select(["a", "b"], lambda s: flat.get(tuple(s), 0.0), epsilon=0.01, start="head")
    assert chosen == ("a", "b")
    assert greedy_select(["a", "b"], lambda s: flat.get(tuple(s), 0.0), epsilon=0.001, start="head")[0] == ()


def test_profile_runner_shares_prefix_per_start_layer():
    dm = Digits(samples_per_class=6)
    dm.setup()
    torch.manual_seed(0)
    runner = ProfileRunner(build_backbone(TINY_VIT, **VIT4), 10, stack_dataset(dm.train_set), stack_dataset(dm.val_set, 60), recipe="fast", steps=2, batch_size=16)
    calls = []
    prefix = runner.chain.prefix
    runner.chain.prefix = lambda x, s: (calls.append(s), prefix(x, s))[1]
    profile = runner.profile()
    assert list(profile) == ["head", "blocks.0", "blocks.1", "blocks.2", "blocks.3"] and all(0 <= a <= 1 for a in profile.values())
    n_calls = len(calls)
    runner.score(("blocks.1", "blocks.3"))  # starts at block 1: features already there
    assert len(calls) == n_calls and runner.score(("blocks.1",)) == profile["blocks.1"]
    assert sorted(runner._features) == sorted((split, s) for split in ("train", "val") for s in range(5))
    assert 0 <= runner.score(FULL) <= 1
    cv = ProfileRunner(runner.backbone, 10, runner.data["train"], steps=1, batch_size=16, folds=3)
    assert 0 <= cv.score(("blocks.3",)) <= 1


def test_profile_callback_sets_layers_and_writes_outputs(tmp_path):
    model = _vit(None)
    cb = SubTuningProfile(steps=1, k=1, out_dir=str(tmp_path))
    trainer = Trainer(fast_dev_run=True, logger=False, callbacks=[cb], enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Digits(samples_per_class=4))
    out = tmp_path / "subtuning_profile"
    assert {p.name for p in out.iterdir()} == {"profile.csv", "greedy.csv", "profile.png", "trainable_layers.yaml"}
    assert model.trainable_names == cb.chosen and len(cb.chosen) <= 1
    assert f"trainable_layers: [{', '.join(cb.chosen)}]" in (out / "trainable_layers.yaml").read_text()
    assert all(p.requires_grad == any(n.startswith(f"backbone.{c}.") for c in cb.chosen) for n, p in model.named_parameters() if n.startswith("backbone."))


def test_multitask_equals_each_model_alone():
    tasks = {name: _vit(layers) for name, layers in {"a": ["blocks.1", "blocks.3"], "b": ["blocks.2"], "c": [], "d": ["blocks.3"]}.items()}
    for seed, m in enumerate(tasks.values()):
        torch.manual_seed(seed)
        for mod in [*m.trainable_modules, m.head]:
            for p in mod.parameters():
                p.data.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 1, 8, 8)
    multi = MultiTaskSubTuned(tasks)
    out = multi(x)
    for name, m in tasks.items():
        assert torch.equal(out[name], m.eval()(x)), name
    # "d" keeps blocks.1 frozen: it must not use "a"'s finetuned blocks.1
    assert not torch.equal(out["d"], tasks["d"].head(tasks["a"].features(x)))
    bad = copy.deepcopy(tasks["b"])
    bad.backbone.blocks[0].mlp.fc1.weight.data += 1
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight differs"):
        MultiTaskSubTuned([tasks["a"], bad])


def test_multitask_hf_bert():
    torch.manual_seed(0)
    base = SubTuningModule("hf/bert", num_classes=3, model_kwargs=HF_KW)
    tasks = [base, copy.deepcopy(base), copy.deepcopy(base)]
    for m, layers in zip(tasks, [[1], [0], []]):
        m.set_trainable_layers(layers)
        m.head.weight.data.normal_()
    tasks[1].backbone.model.encoder.layer[0].output.dense.weight.data.normal_()
    x = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": MASK}
    for got, m in zip(MultiTaskSubTuned(tasks)(x), tasks):
        assert torch.allclose(got, m.eval()(x), atol=1e-6)


class SaveInitState(Callback):
    """Saves rank 0's state_dict when training starts (to compare frozen parameters after DDP), and each
    rank's count of samples whose inputs its datasets skip, at the last epoch's end."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, Path(self.out_dir) / "init.pt")

    def on_train_epoch_end(self, trainer, pl_module):  # listed after SkipCachedInputs: the masks of this epoch
        dm = trainer.datamodule
        counts = {s: int(d.cached.sum()) if d.cached is not None else 0 for s, d in (("train", dm.train_set), ("val", dm.val_set))}
        counts["val_shard"] = len(trainer.val_dataloaders.sampler)
        (Path(self.out_dir) / f"skipped{trainer.global_rank}.json").write_text(json.dumps(counts))

    def on_train_end(self, trainer, pl_module):  # each rank's own cache rows, to compare with the checkpoint's
        torch.save(pl_module.caches["train"].state(), Path(self.out_dir) / f"cache{trainer.global_rank}.pt")


def test_ddp_two_processes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "--model=zoo.subtuning.SubTuningModule", f"--model.model={TINY_VIT}", f"--model.model_kwargs={json.dumps(VIT4)}",
        "--model.trainable_layers=[blocks.2]", "--model.cache_frozen_features=true",
        "--data=datamodules.Digits", "--data.with_index=true", "--data.samples_per_class=8", "--data.batch_size=8",
        "--trainer.max_epochs=2", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=callbacks.skip_cached_inputs.SkipCachedInputs", "--trainer.callbacks+=tests.zoo.test_subtuning.SaveInitState", f"--trainer.callbacks.out_dir={out}",
    ]
    r0, r1 = run_ddp(args, out, cwd=tmp_path)
    init = torch.load(out / "init.pt")
    assert r0["global_step"] == r1["global_step"] == 10  # 80 samples / (2 ranks x 8) x 2 epochs
    for rank in range(2):  # each rank skips the inputs it cached: its training samples of both epochs (40 each), its val shard
        counts, own = json.loads((out / f"skipped{rank}.json").read_text()), torch.load(out / f"cache{rank}.pt")
        assert counts["train"] == len(own["index"]) > 40 and counts["val"] == counts["val_shard"] > 0, counts
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), k
        trained = k.startswith(("head.", "backbone.blocks.2."))
        if v.is_floating_point():
            assert torch.equal(v, init[k]) != trained, k
    # Rank 0's checkpoint holds every rank's own cache rows (gathered), which together cover every training sample.
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=False)["subtuning_feature_cache"]["ranks"]
    assert len(saved) == 2
    rows = []
    for rank, state in enumerate(saved):
        own, got = torch.load(out / f"cache{rank}.pt"), state["caches"][state["splits"]["train"]]
        assert len(own["index"]) >= 40 and torch.equal(got["index"], own["index"]) and torch.equal(got["values"], own["values"]), rank
        rows.append(set(own["index"].tolist()))
    assert rows[0] != rows[1] and rows[0] | rows[1] == set(range(80))


def test_resume_matches_uninterrupted_run(tmp_path):
    """The checkpoint keeps the filled cache rows: a resumed fit runs no frozen prefix and equals the uninterrupted
    run bit for bit. With checkpoint_feature_cache=false the checkpoint has none and the prefix runs again."""
    def fit(epochs, ckpt=None, keep=True):
        seed_everything(0)
        model = _vit(["blocks.3"], cache_frozen_features=True, checkpoint_feature_cache=keep)
        dm = Digits(samples_per_class=5, batch_size=16, with_index=True)
        counter = CountLoads(dm)
        trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[counter], default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer, model, counter.prefix_calls[0], dm

    reference, full, _, _ = fit(3)
    for keep in (True, False):
        trainer, mid, _, dm = fit(2, keep=keep)
        trainer.save_checkpoint(tmp_path / f"mid{keep}.ckpt")
        saved = torch.load(tmp_path / f"mid{keep}.ckpt", weights_only=False).get("subtuning_feature_cache")
        if keep:
            (state,) = saved["ranks"]
            cache, rows = mid.caches["train"], state["caches"][state["splits"]["train"]]
            assert len(rows["index"]) == len(dm.train_set) == int(cache.filled.sum()) and torch.equal(rows["values"], cache.values[rows["index"]])
            restored = load_zoo_module(tmp_path / "midTrue.ckpt")
            assert restored.trainable_names == ["blocks.3"] and restored.cache_frozen_features
        else:
            assert saved is None
        trainer, resumed, prefix_calls, _ = fit(3, tmp_path / f"mid{keep}.ckpt", keep=keep)
        assert trainer.global_step == reference.global_step and (prefix_calls == 0) == keep, prefix_calls
        for k, v in full.state_dict().items():
            assert (torch.equal if keep else torch.allclose)(v, resumed.state_dict()[k]), k
