"""EMoE: balanced clustering, mean-key gates, exactness at k = N, sparse dispatch, round trip, the Moefy surgery and
BalanceLoss term (EMoEModule is the same as zoo.Classifier + those parts), DDP, resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_ddp
from zoo.backbones import build_backbone
from zoo.batch import Batch
from zoo.classifier import Classifier
from zoo.emoe import BalanceLoss, EMoEFFN, EMoEModule, Moefy, balanced_clusters, demoefy, emoe_layers, find_ffns, moefy, paper_defaults
from zoo.losses import CrossEntropy

VOCAB = 100


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "timm":
        return build_backbone(TINY_VIT, **TINY_VIT_KWARGS)
    if family == "bert":
        return build_backbone("hf/bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB)
    if family == "gpt2":
        return build_backbone("hf/gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0)
    return build_backbone("hf/llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, vocab_size=VOCAB, mlp_bias=True)


def inputs(family: str):
    g = torch.Generator().manual_seed(1)
    if family == "timm":
        return torch.randn(4, 1, 8, 8, generator=g)
    return {"input_ids": torch.randint(0, VOCAB, (4, 6), generator=g), "attention_mask": torch.ones(4, 6, dtype=torch.long)}


FAMILIES = ["timm", "bert", "gpt2", "llama"]
DENSE_CLASS = {"timm": "Mlp", "bert": "BertIntermediate", "gpt2": "GPT2MLP", "llama": "LlamaMLP"}


def test_balanced_clusters_are_equal_sized_deterministic_and_find_directions():
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    truth = torch.arange(4).repeat_interleave(12)[torch.randperm(48)]
    # rows: a direction plus a little noise, with wildly different norms (clustering normalises them)
    keys = (directions[truth] + 0.05 * torch.randn(48, 16)) * torch.rand(48, 1).mul(20).add(0.1)
    labels = balanced_clusters(keys, 4, seed=0)
    assert torch.bincount(labels).tolist() == [12] * 4
    assert torch.equal(labels, balanced_clusters(keys, 4, seed=0))
    for c in range(4):  # each cluster is exactly one true direction
        assert truth[labels == c].unique().numel() == 1
    random_labels = balanced_clusters(torch.randn(96, 8), 6, seed=3)
    assert torch.bincount(random_labels).tolist() == [16] * 6


def test_gate_is_mean_key_and_follows_every_optimizer_step():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 24), nn.Linear(24, 8)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=3, top_k=1)
    for e in range(3):
        rows = layer.neuron_order[e * 8:(e + 1) * 8]
        torch.testing.assert_close(layer.mean_keys()[e], fc1.weight[rows].mean(0))
    x = torch.randn(20, 8)
    # fused AdamW does not bump tensor versions: the gate must still follow the new weights
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    layer(x).pow(2).sum().backward()
    opt.step()
    new_keys = layer.fc1_weight.detach().mean(1)
    torch.testing.assert_close(layer.mean_keys(), new_keys)
    torch.testing.assert_close(layer.scores(x), x @ new_keys.t())


def test_sparse_forward_equals_per_token_reference():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 6)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=4, top_k=2).eval()
    x = torch.randn(2, 5, 8)
    labels = torch.empty(32, dtype=torch.long)
    labels[layer.neuron_order] = torch.arange(4).repeat_interleave(8)
    gates = torch.stack([fc1.weight[labels == e].mean(0) for e in range(4)])
    expected = []
    for t in x.reshape(-1, 8):
        y = fc2.bias.clone()
        for e in (t @ gates.t()).topk(2).indices:
            h = torch.nn.functional.gelu(fc1.weight[labels == e] @ t + fc1.bias[labels == e])
            y = y + fc2.weight[:, labels == e] @ h
        expected.append(y)
    torch.testing.assert_close(layer(x), torch.stack(expected).reshape(2, 5, 6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_at_k_equals_n_and_round_trip_to_dense(family, tmp_path):
    dense = tiny(family).eval()
    x = inputs(family)
    with torch.no_grad():
        ref = dense(x)
    emoe = moefy(dense, num_experts=8, top_k=8)
    assert len(emoe_layers(emoe)) == 2 and not emoe_layers(dense), "moefy must convert a copy by default"
    with torch.no_grad():
        assert (emoe(x) - ref).abs().max() <= 1e-5
        for _, layer in emoe_layers(emoe):  # the converted model is then finetuned: move its weights
            for p in layer.parameters():
                p.add_(0.01 * torch.randn_like(p))
        tuned = emoe(x)
    back = demoefy(emoe)
    assert not emoe_layers(back) and [f for _, f in find_ffns(back)] == [family] * 2
    assert any(type(m).__name__ == DENSE_CLASS[family] for m in back.modules())
    assert set(back.state_dict()) == set(dense.state_dict())
    torch.save(back.state_dict(), tmp_path / "dense.pt")
    fresh = tiny(family).eval()
    fresh.load_state_dict(torch.load(tmp_path / "dense.pt"))
    with torch.no_grad():
        assert (fresh(x) - tuned).abs().max() <= 1e-5


@pytest.mark.parametrize("family,gate", [("timm", "emergent"), ("llama", "emergent"), ("gpt2", "learned")])
def test_sparse_dispatch_equals_masked_reference_at_k_below_n(family, gate):
    model = moefy(tiny(family), num_experts=8, top_k=3, gate=gate).eval()
    x = inputs(family)
    results = {}
    for dispatch in ("sparse", "masked"):
        for _, layer in emoe_layers(model):
            layer.dispatch = dispatch
        model.zero_grad()
        out = model(x)
        out.pow(2).mean().backward()
        results[dispatch] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (out_s, grad_s), (out_m, grad_m) = results["sparse"], results["masked"]
    torch.testing.assert_close(out_s, out_m, atol=1e-5, rtol=1e-4)
    assert grad_s.keys() == grad_m.keys() and any("fc1_weight" in n for n in grad_s)
    for n in grad_s:
        torch.testing.assert_close(grad_s[n], grad_m[n], atol=1e-5, rtol=1e-4)
    if gate == "learned":
        router = [n for n in grad_s if ".router." in n]  # the cosine router's parameters (the official default)
        assert router and all(grad_s[n].abs().sum() > 0 for n in router)
    dense = tiny(family).eval()
    assert (out_s - dense(x)).abs().max() > 1e-3  # k < N really drops experts


def test_balance_loss_and_noise():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
    # ours (GShard over all top-k choices; the official loss is tests/fidelity/test_emoe_balance_weight.py)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.ReLU(), num_experts=4, top_k=2, balance_loss=True, aux_loss="gshard_topk").train()
    x = torch.randn(30, 8)
    layer(x)
    scores = x @ layer.mean_keys().t()
    share = torch.bincount(scores.topk(2).indices.reshape(-1), minlength=4).float() / 60
    torch.testing.assert_close(layer.aux_loss, 4 * (share * scores.softmax(-1).mean(0)).sum())
    assert torch.equal(layer.routing_counts, torch.bincount(scores.topk(2).indices.reshape(-1), minlength=4))
    layer.gate_noise = 100.0
    assert not torch.equal(layer.scores(x), scores)
    layer.eval()
    torch.testing.assert_close(layer.scores(x), scores)  # no noise at evaluation


def test_a_bare_ffn_block_converts_and_comes_back():
    from timm.layers import Mlp

    torch.manual_seed(0)
    dense, x = Mlp(16, 32).eval(), torch.randn(5, 16)
    layer = moefy(dense, 4, 4)
    assert isinstance(layer, EMoEFFN) and layer.family == "timm"
    torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-5)
    back = demoefy(layer)
    assert type(back) is Mlp
    torch.testing.assert_close(back(x), dense(x), atol=0, rtol=0)


def test_layer_selection_and_paper_defaults():
    vit = build_backbone(TINY_VIT, **{**TINY_VIT_KWARGS, "depth": 4})
    assert [n for n, _ in emoe_layers(moefy(vit, 4, 1, layers=[1, -1]))] == ["blocks.1.mlp", "blocks.3.mlp"]
    assert [n for n, _ in emoe_layers(moefy(vit, 4, 1, layers=["blocks.2.mlp"]))] == ["blocks.2.mlp"]
    assert len(emoe_layers(moefy(vit, 4, 1, layers=["blocks.*"]))) == 4
    assert paper_defaults("bert", 12) == (64, 16, [10])
    assert paper_defaults("timm", 12) == (24, 4, [8, 10])  # official ViT-S: ['F'] * 8 + ['S', 'F'] * 2
    assert paper_defaults("llama", 30) == (64, 16, [15, 18, 21, 24, 27])  # from L/2 every L/8 (official 7B: 16, 20, 24, 28)


def test_bad_inputs_fail_with_clear_messages():
    vit = tiny("timm")  # FFN width 64
    with pytest.raises(ValueError, match="num_experts=6 does not divide the FFN width 64"):
        moefy(vit, 6, 1)
    with pytest.raises(ValueError, match=r"top_k=5: expected an integer in \[1, num_experts=4\]"):
        moefy(vit, 4, 5)
    with pytest.raises(ValueError, match="top_k=0"):
        moefy(vit, 4, 0)
    with pytest.raises(ValueError, match="gate='soft'"):
        moefy(vit, 4, 1, gate="soft")
    with pytest.raises(ValueError, match="cluster_inits=0"):
        moefy(vit, 4, 1, cluster_inits=0)
    with pytest.raises(ValueError, match="dispatch='dense'"):
        moefy(vit, 4, 1, dispatch="dense")
    with pytest.raises(ValueError, match="index 7 is out of range"):
        moefy(vit, 4, 1, layers=[7])
    with pytest.raises(ValueError, match="'blocks.9.mlp' names no supported FFN"):
        moefy(vit, 4, 1, layers=["blocks.9.mlp"])
    with pytest.raises(ValueError, match="no supported FFN block"):
        moefy(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), 2, 1)
    with pytest.raises(ValueError, match="already converted"):
        moefy(moefy(vit, 4, 1), 4, 1)
    with pytest.raises(ValueError, match="no EMoE layer"):
        demoefy(vit)
    with pytest.raises(ValueError, match="gate='x'"):
        EMoEModule(TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=4, top_k=1, gate="x")
    with pytest.raises(ValueError, match="num_experts=24 does not divide the FFN width 64"):
        EMoEModule(TINY_VIT, pretrained=False, model_kwargs=TINY_VIT_KWARGS)  # the ViT paper default needs width % 24 == 0


def _module(seed: int = 0) -> EMoEModule:
    module = EMoEModule(TINY_VIT, num_classes=10, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=8, top_k=2,
                        layers=["*"], gate_noise=0.0, balance_loss_weight=0.01, cluster_seed=seed)
    module.configure_model()  # the surgery (a Trainer calls this before fit)
    return module


def test_module_resumes_with_its_stored_clustering(tmp_path):
    from datamodules import Digits

    L.seed_everything(0)
    module = _module()
    assert module.hparams.num_experts == 8 and module.hparams.cluster_seed == 0
    assert "surgery" not in module.hparams and "losses" not in module.hparams  # the preset's own arguments only
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, Digits(batch_size=32))
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    order = {n: m.neuron_order.clone() for n, m in module.emoe_layers()}
    # a different seed clusters the freshly built model differently, the checkpoint must win
    assert any(not torch.equal(m.neuron_order, order[n]) for n, m in _module(seed=5).emoe_layers())
    loaded = EMoEModule.load_from_checkpoint(ckpt, cluster_seed=5).eval()
    assert all(torch.equal(m.neuron_order, order[n]) for n, m in loaded.emoe_layers())
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), module.eval()(x))
    resumed = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    resumed.fit(EMoEModule.load_from_checkpoint(ckpt, cluster_seed=5), Digits(batch_size=32), ckpt_path=ckpt)
    assert resumed.global_step == 4


def test_ddp_keeps_ranks_in_sync_with_unused_experts(tmp_path):
    # top-1 of 16 experts on 4-image batches: most experts get no token on a rank, yet plain DDP
    # (find_unused_parameters=False) works because each layer's experts share one tensor per weight
    kwargs = json.dumps(TINY_VIT_KWARGS)
    args = dict(model=TINY_VIT, num_classes=10, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=16, top_k=1, layers=[0, 1])
    states = run_ddp(["--seed_everything=0", "--model=zoo.emoe.EMoEModule", f"--model.model={TINY_VIT}", "--model.pretrained=false",
                      f"--model.model_kwargs={kwargs}", "--model.num_experts=16", "--model.top_k=1", "--model.layers=[0, 1]",
                      "--data=datamodules.Digits", "--data.batch_size=4", "--trainer.max_steps=3", "--trainer.logger=false",
                      "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}"],
                     tmp_path / "out", cwd=tmp_path)
    assert [s["global_step"] for s in states] == [3, 3]
    a, b = states[0]["state_dict"], states[1]["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    L.seed_everything(0)
    init_module = EMoEModule(**args)
    init_module.configure_model()
    init = init_module.state_dict()
    for name in ("blocks.0.mlp", "blocks.1.mlp"):
        assert torch.equal(a[f"backbone.{name}.neuron_order"], init[f"backbone.{name}.neuron_order"])
        assert not torch.allclose(a[f"backbone.{name}.fc1_weight"], init[f"backbone.{name}.fc1_weight"])


# -- the parts: Moefy (surgery) and BalanceLoss (loss term) -------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_moefy_surgery_undo_gives_a_plain_model_computing_the_same_function(family):
    dense = tiny(family).eval()
    x = inputs(family)
    with torch.no_grad():
        ref = dense(x)
    original = {k: v.clone() for k, v in dense.state_dict().items()}
    surgery = Moefy(num_experts=8, top_k=8, layers=["*"], gate_noise=0.0)
    model = surgery.apply(dense)  # in place
    assert len(emoe_layers(model)) == 2 and model is dense
    with torch.no_grad():
        assert (model(x) - ref).abs().max() <= 1e-5  # k = N: the dense function
        for _, layer in emoe_layers(model):  # finetuning moves the experts
            for p in layer.parameters():
                p.add_(0.01 * torch.randn_like(p))
        tuned = model(x)
    plain = surgery.undo(model)
    assert not emoe_layers(plain) and any(type(m).__name__ == DENSE_CLASS[family] for m in plain.modules())
    assert set(plain.state_dict()) == set(original)
    with torch.no_grad():
        assert (plain(x) - tuned).abs().max() <= 1e-5  # the same function as the EMoE model it undoes
    # below k = N, apply + undo with no training in between gives the dense weights back exactly
    sparse = Moefy(num_experts=8, top_k=2, layers=["*"])
    back = sparse.undo(sparse.apply(tiny(family)))
    for k, v in back.state_dict().items():
        assert torch.equal(v, tiny(family).state_dict()[k]), k


@pytest.mark.parametrize("family", ["timm", "llama"])
def test_narrower_experts_turn_back_into_a_narrower_dense_ffn(family):
    model = moefy(tiny(family), num_experts=8, top_k=8).eval()  # k = N: the EMoE model is a dense function
    x = inputs(family)
    for _, layer in emoe_layers(model):  # structured pruning keeps 5 of each expert's 8 neurons
        layer.keep_neurons(layer.neuron_norms().topk(5, dim=1).indices.sort(dim=1).values)
        assert layer.fc1_weight.shape[:2] == (8, 5) and sorted(layer.neuron_order.tolist()) == list(range(40))
    with torch.no_grad():
        narrow = model(x)
        back = demoefy(model)
        torch.testing.assert_close(back(x), narrow, atol=1e-5, rtol=1e-5)
    first = [m for m in back.modules() if isinstance(m, nn.Linear) and m.weight.shape[0] == 40]
    assert len(first) == 2 * (2 if family == "llama" else 1) and all(m.out_features == 40 for m in first)


def test_moefy_leaves_experts_of_a_frozen_part_frozen_and_checks_early():
    vit = tiny("timm")
    vit.blocks[0].requires_grad_(False)
    Moefy(num_experts=8, top_k=2, layers=["*"]).apply(vit)
    (_, first), (_, second) = emoe_layers(vit)
    assert not any(p.requires_grad for p in first.parameters()) and all(p.requires_grad for p in second.parameters())
    with pytest.raises(ValueError, match="gate='soft'"):
        Moefy(gate="soft")
    with pytest.raises(ValueError, match="num_experts=6 does not divide the FFN width 64"):
        Moefy(num_experts=6, top_k=1, layers=["*"]).resolve(tiny("timm"))
    assert Moefy(num_experts=8, top_k=2, layers=[1]).resolve(tiny("timm")) == (8, 2, ["blocks.1.mlp"])
    assert Moefy(layers=["*"]).config()["init_args"]["layers"] == ["*"]


def test_module_is_a_classifier_with_moefy_and_balance_loss():
    args = dict(model=TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS)
    torch.manual_seed(0)
    preset = EMoEModule(**args, pretrained=False, num_experts=8, top_k=2, layers=["*"], gate_noise=0.0, balance_loss_weight=0.01)
    torch.manual_seed(0)
    parts = Classifier(**args, surgery=[Moefy(8, 2, ["*"], gate_noise=0.0, balance_loss=True)], losses=[CrossEntropy(), BalanceLoss(0.01)])
    for m in (preset, parts):
        m.configure_model()
    assert preset.state_dict().keys() == parts.state_dict().keys()
    for k, v in preset.state_dict().items():
        assert torch.equal(v, parts.state_dict()[k]), k
    batch = Batch(torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)))
    torch.manual_seed(1)  # the same expert dropout masks in both (ViT: p 0.1)
    loss, logits, _ = preset.train().training_loss(batch)
    aux = torch.stack([m.aux_loss for _, m in preset.emoe_layers()]).sum()  # summed over layers, as the official scripts
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, batch.targets) + 0.01 * aux)
    torch.manual_seed(1)
    torch.testing.assert_close(parts.train().training_loss(batch)[0], loss)


def test_balance_loss_is_logged_and_needs_layers_that_compute_it(tmp_path):
    from datamodules import Digits

    def fit(module):
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, limit_val_batches=0)
        trainer.fit(module, Digits(batch_size=16))
        return trainer

    trainer = fit(_module())
    assert {"train/balance_loss", "train/cross_entropy"} <= set(trainer.logged_metrics)
    assert trainer.logged_metrics["train/balance_loss"] > 0  # tutel's load + importance loss: squared CVs, 0 only when balanced
    no_aux = Classifier(TINY_VIT, model_kwargs=TINY_VIT_KWARGS, surgery=[Moefy(8, 2, ["*"])], losses=[CrossEntropy(), BalanceLoss(0.01)])
    with pytest.raises(ValueError, match="balance_loss: true"):
        fit(no_aux)


def test_stacked_expert_biases_get_no_weight_decay_on_any_module():
    from zoo.classifier import param_groups

    plain = Classifier(model=TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS,
                       surgery=[Moefy(num_experts=8, top_k=2, layers=["*"])])
    for module in (plain, _module()):
        module.configure_model()
        decay, no_decay = param_groups(module, module.no_weight_decay())
        names = {id(p): n for n, p in module.named_parameters()}
        no_decay_names = {names[id(p)] for p in no_decay["params"]}
        assert any(n.endswith("fc1_bias") for n in no_decay_names)
        assert not any(names[id(p)].endswith("fc1_bias") for p in decay["params"])
        assert any(names[id(p)].endswith("fc1_weight") for p in decay["params"])
