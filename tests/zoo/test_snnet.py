"""SN-Net / SN-Netv2: stitch enumeration, least-squares init, select/extract, FLOPs, training, resume, DDP, bad inputs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.flop_counter import FlopCounterMode

from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_cli
from zoo.backbones import build_backbone
from zoo.batch import Batch
from zoo.distillation import SoftTargetKL
from zoo.distillation.teachers import pool_of
from zoo.losses import CrossEntropy
from zoo.snnet import (FLOP_MAPPING, Anchors, SNNetModule, Stitch, StitchableNet, StitchedViT, StitchingLayer, StitchSampler, check_find_unused,
                       least_squares, window_positions)
from zoo.surgery import instantiate


def vit(width: int, depth: int = 2, **kw) -> torch.nn.Module:
    return build_backbone(TINY_VIT, **{**TINY_VIT_KWARGS, "embed_dim": width, "depth": depth, **kw})


def make_net(widths=(32, 16, 48), depth=2, **kw) -> StitchableNet:
    torch.manual_seed(0)
    anchors = [vit(w, depth) for w in widths]
    return StitchableNet(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors], **kw)


def digits_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    dm = Digits(batch_size=n)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    return batch.inputs, batch.targets


def anchor_spec(width: int, depth: int = 2) -> dict:
    return {"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": width, "depth": depth}}


# -- enumeration ---------------------------------------------------------------------------
def brute_force_positions(depth: int, kernel: int, stride: int) -> set:  # official: windows start until the last block, cut there
    return {(j, k) for s in range(0, depth, stride) for j in range(s, min(s + kernel, depth)) for k in range(s, min(s + kernel, depth))}


@pytest.mark.parametrize("depth,kernel,stride", [(12, 2, 1), (12, 3, 2), (6, 1, 1), (5, 4, 1)])
def test_window_positions_are_every_pair_inside_a_window(depth, kernel, stride):
    pos = window_positions(depth, depth, kernel, stride)
    assert {(j, k) for j, k, _ in pos} == brute_force_positions(depth, kernel, stride)
    assert len(pos) == len({(j, k) for j, k, _ in pos})
    for layer in {layer for _, _, layer in pos}:  # a layer's positions all lie in one window
        ids = [b for j, k, l in pos if l == layer for b in (j, k)]
        assert max(ids) - min(ids) < kernel


def test_paper_counts_71_stitches_and_11_layers_per_pair():
    net = make_net(widths=(16, 32, 24), depth=12)
    kinds = [s.kind for s in net.stitches]
    assert len(net) == 71 and kinds.count("anchor") == 3 and kinds.count("sl") == 68
    assert {k: len(v) for k, v in net.stitch_layers.items()} == {"0-1": 11, "1-2": 11}
    assert [net.anchors[a].embed_dim for a in range(3)] == [16, 24, 32]  # sorted by size
    s = net.stitches[3 + 5]  # sixth position of pair 0->1: window [2, 3]
    assert s.route == (0, 1) and s.cuts == ((2, 1),) and s.layers == (1,)
    assert s.description == "A0(w16x12)[0:3] -> A1(w24x12)[1:12]"


def test_two_way_adds_reverse_and_chain_stitches():
    net = make_net(widths=(16, 32, 24), depth=12, two_way=True, space="v1")  # our windowed two-way space (v2's: tests/fidelity)
    count = {k: sum(s.kind == k for s in net.stitches) for k in ("anchor", "sl", "ls", "sls", "lsl")}
    # chains use the 11 "aligned" positions (j -> j + 1) of each leg, with the middle anchor running >= 1 block
    assert count == {"anchor": 3, "sl": 68, "ls": 68, "sls": 2 * 55, "lsl": 2 * 55}
    assert set(net.stitch_layers) == {"0-1", "1-2", "1-0", "2-1"}
    for s in net.stitches:
        if s.kind in ("sls", "lsl"):
            (j1, k1), (j2, k2) = s.cuts
            assert s.route[0] == s.route[2] != s.route[1] and k1 == j1 + 1 and k2 == j2 + 1 and j2 >= k1
            assert (s.route[0] < s.route[1]) == (s.kind == "sls")


def test_depth_interpolation_maps_blocks():
    anchors = [vit(16, 2), vit(32, 4)]
    net = StitchableNet(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors], two_way=True, space="v1").eval()
    assert {(j, k) for j, k, _ in net.positions[(0, 1)]} == {(0, 0), (0, 2), (1, 0), (1, 2)}
    assert {(j, k) for j, k, _ in net.positions[(1, 0)]} == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 1)}  # 4 -> 2 blocks: k // 2
    assert net.stitches[2 + 3].description == "A0(w16x2)[0:2] -> A1(w32x4)[2:4]"
    x = torch.randn(3, 1, 8, 8)
    out = net.forward_all(x)
    for s in net.stitches:
        torch.testing.assert_close(out[s.id], net(x, s.id), atol=1e-5, rtol=1e-5)


# -- forward, select, extract, forward_all -------------------------------------------------
def test_stitch_forward_matches_manual_composition():
    net = make_net().eval()
    x = torch.randn(5, 1, 8, 8)
    for a in net.anchor_ids:  # an anchor alone is exactly the original model
        torch.testing.assert_close(net(x, a), net.heads[a](net.anchors[a](x)))
    s = next(s for s in net.stitches if s.cuts == ((0, 1),) and s.route == (0, 1))
    front, end = net.anchors[0], net.anchors[1]
    h = front.blocks[0](front.norm_pre(front.pos_drop(front._pos_embed(front.patch_embed(x)))))
    h = F.linear(h, net.layer(0, 1, s.layers[0]).weight, net.layer(0, 1, s.layers[0]).bias)
    ref = net.heads[1](end.forward_head(end.norm(end.blocks[1](h))))
    torch.testing.assert_close(net(x, s.id), ref)
    net.select(s.id)
    torch.testing.assert_close(net(x), ref)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_extract_and_forward_all_equal_each_stitch(lora_rank):
    net = make_net(two_way=True, lora_rank=lora_rank)
    net.init_stitching_layers(digits_batch(16)[0])
    if lora_rank:
        for layers in net.stitch_layers.values():
            for layer in layers:
                torch.nn.init.normal_(layer.lora_b, std=0.1)
    net.eval()
    x = torch.randn(6, 1, 8, 8)
    all_out = net.forward_all(x)
    assert sorted(all_out) == list(range(len(net)))
    for s in net.stitches:
        ref = net(x, s.id)
        torch.testing.assert_close(all_out[s.id], ref, atol=1e-5, rtol=1e-5)
        small = net.extract(s.id)
        assert not any(isinstance(m, StitchingLayer) for m in small.modules())
        assert (small(x) - ref).abs().max() <= 1e-5
    small = net.extract(len(net) - 1)
    before = small(x)
    torch.nn.init.zeros_(net.anchors[0].blocks[0].mlp.fc2.weight)  # extract is a copy, not a view
    torch.testing.assert_close(small(x), before)
    assert net.forward_all(x, [0, 5]).keys() == {0, 5}


def test_flops_and_params_match_whole_model_counts():
    net = make_net().eval()
    x = net.example_input()
    for s in (0, 2, 5, len(net) - 1):
        with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
            net(x, s)
        with FlopCounterMode(display=False) as linear_only:
            net(x, s)
        assert net.flops(s) == counter.get_total_flops() > linear_only.get_total_flops() > 0  # attention counted too
        assert net.params(s) == sum(p.numel() for p in net.extract(s).parameters())
    a = net.anchor_ids[-1]
    assert net.params(a) == sum(p.numel() for p in net.anchors[a].parameters()) + sum(p.numel() for p in net.heads[a].parameters())
    assert net.flops(0) < net.flops(1) < net.flops(2)


def test_lora_stitching_layer_trains_low_rank_and_merges_in_eval():
    layer = StitchingLayer(6, 4, rank=2, alpha=4.0)
    torch.nn.init.normal_(layer.lora_b)
    assert not layer.weight.requires_grad and layer.lora_a.requires_grad and layer.lora_b.requires_grad
    x = torch.randn(3, 5, 6)
    ref = x @ (layer.weight + 2.0 * layer.lora_b @ layer.lora_a).T + layer.bias
    torch.testing.assert_close(layer.train()(x), ref)
    torch.testing.assert_close(layer.eval()(x), ref)
    torch.testing.assert_close(layer.to_linear()(x), ref)


# -- stitching as surgery ------------------------------------------------------------------
def test_stitch_surgery_makes_the_net_and_undo_is_the_selected_stitch():
    torch.manual_seed(0)
    backbones = [vit(w, 4) for w in (32, 16, 48)]
    anchors = Anchors(backbones, [torch.nn.Linear(b.num_features, 10) for b in backbones], ["a", "b", "c"])
    anchors.backbones[0].requires_grad_(False)  # a frozen anchor stays frozen, the new stitching layers train
    surgery = instantiate(Stitch(kernel_size=3, two_way=True, lora_rank=2, lora_alpha=4.0, eval_stitch=5).config())  # as hparams store it
    net = surgery(anchors)
    assert isinstance(net, StitchableNet) and net.active == 5 and net.kernel_size == 3 and net.two_way
    assert net.names == ["b(w16x4)", "a(w32x4)", "c(w48x4)"] and net.anchors[1] is backbones[0] and net.heads[1] is anchors.heads[0]
    assert len(net) == len(make_net(depth=4, kernel_size=3, two_way=True))
    assert not any(p.requires_grad for p in net.anchors[1].parameters())
    assert all(layer.lora_a.requires_grad and layer.scaling == 2.0 for layers in net.stitch_layers.values() for layer in layers)
    net.init_stitching_layers(digits_batch(16)[0])
    for layers in net.stitch_layers.values():
        for layer in layers:
            torch.nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(4, 1, 8, 8)
    for kind in ("anchor", "sl", "ls", "sls", "lsl"):
        s = [s for s in net.stitches if s.kind == kind][-1]
        net.select(s.id)
        plain = surgery.undo(net.eval())
        assert type(plain) is StitchedViT and plain.description == s.description
        assert not any(isinstance(m, StitchingLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), net(x), atol=1e-5, rtol=1e-5)


def test_module_stitches_in_configure_model_and_unloads_the_chosen_stitch(tmp_path):
    module = SNNetModule([anchor_spec(32, 3), anchor_spec(16, 3)], two_way=True, lora_rank=2)
    assert type(module.backbone) is Anchors and module.sampler is None and "surgery" not in module.hparams  # not stitched yet
    fit(module, tmp_path, 2)  # Lightning's configure_model stitches
    assert [type(t) for t in module.surgery] == [Stitch] and module.backbone is module.net and isinstance(module.net, StitchableNet)
    s = [s for s in module.net.stitches if s.kind == "lsl"][0]
    for layers in module.net.stitch_layers.values():  # LoRA updates that matter: unloading merges them
        for layer in layers:
            torch.nn.init.normal_(layer.lora_b, std=0.1)
    module.select_stitch(s.id)
    x = digits_batch(8)[0]
    with torch.no_grad():
        ref = module.eval()(x)
        plain = module.unload_surgery()
        assert type(plain) is StitchedViT and module.backbone is plain and plain.description == s.description
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unload_surgery"):
        module.net


# -- least squares -------------------------------------------------------------------------
def test_least_squares_init_fits_target_activations():
    net = make_net(widths=(16, 32), kernel_size=1)  # one position per layer: (0, 0) and (1, 1)
    x, _ = digits_batch(64)
    feats = net.block_inputs(x)
    X, Y = feats[0][1], feats[1][0]  # position (0, 0): front output of block 0 -> end input of block 0
    layer = net.layer(0, 1, 0)
    random_err = F.mse_loss(layer(X), Y)
    net.init_stitching_layers(x)
    ls_err = F.mse_loss(layer(X), Y)
    assert ls_err < 0.5 * random_err
    Xa = torch.cat([X.reshape(-1, 16), torch.ones(X.shape[0] * X.shape[1], 1)], 1).double()
    ref = torch.linalg.lstsq(Xa, Y.reshape(-1, 32).double()).solution  # reference solver
    torch.testing.assert_close(layer.weight, ref[:-1].T.float(), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(layer.bias, ref[-1].float(), atol=1e-4, rtol=1e-3)
    assert bool(net.ls_initialized)


def test_shared_layer_takes_mean_of_position_solutions():
    net = make_net(widths=(16, 32))  # kernel 2 on 2 blocks: 4 positions share layer 0
    x, _ = digits_batch(32)
    net.init_stitching_layers(x)
    feats = net.block_inputs(x)
    sols = [least_squares(feats[0][j + 1], feats[1][k]) for j, k, _ in net.positions[(0, 1)]]
    torch.testing.assert_close(net.layer(0, 1, 0).weight, torch.stack([w for w, _ in sols]).mean(0))
    torch.testing.assert_close(net.layer(0, 1, 0).bias, torch.stack([b for _, b in sols]).mean(0))


# -- sampler -------------------------------------------------------------------------------
def test_sampler_is_a_function_of_seed_and_draw_count_and_groups_by_flops():
    flops = [10, 11, 30, 31, 32, 100]
    a, b = StitchSampler(flops, "flops", flops_gap=0.05, seed=3), StitchSampler(flops, "flops", flops_gap=0.05, seed=3)
    assert a.groups == [[0, 1], [2, 3, 4], [5]]
    seq = [a.sample() for _ in range(40)]
    assert seq == [b.sample() for _ in range(40)] and set(seq) == set(range(6))
    c = StitchSampler(flops, "flops", flops_gap=0.05, seed=3)
    c.load_state_dict({**a.state_dict(), "draws": 20})
    assert [c.sample() for _ in range(20)] == seq[20:]
    weighted = StitchSampler(flops, "flops", group_weights=[0, 0, 1])
    assert {weighted.sample() for _ in range(10)} == {5}
    with pytest.raises(ValueError, match="expected 3 non-negative weights"):
        StitchSampler(flops, "flops", group_weights=[1, 1])
    with pytest.raises(ValueError, match="does not match"):
        StitchSampler(flops, "uniform").load_state_dict(a.state_dict())


# -- module --------------------------------------------------------------------------------
class RecordStitches(Callback):
    """Records the stitch of every training step (saved per rank when ``out_dir`` is given)."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir, self.stitches = out_dir, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stitches.append(pl_module.last_stitch)

    def on_train_end(self, trainer, pl_module):
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            torch.save(self.stitches, Path(self.out_dir) / f"stitches{trainer.global_rank}.pt")


def fit(module, tmp_path, max_steps, ckpt_path=None, **trainer_kw):
    rec = RecordStitches()
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, limit_val_batches=1, default_root_dir=tmp_path, callbacks=[rec], **trainer_kw)
    trainer.fit(module, Digits(batch_size=32), ckpt_path=ckpt_path)
    return trainer, rec.stitches


def test_resume_continues_the_stitch_sequence(tmp_path):
    kw = dict(anchors=[anchor_spec(32), anchor_spec(16)], two_way=True, sampling="flops", sample_seed=7)
    _, full = fit(SNNetModule(**kw), tmp_path, 8)
    module = SNNetModule(**kw)
    trainer, first = fit(module, tmp_path, 4)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = {k: v.clone() for k, v in module.net.stitch_layers.state_dict().items()}
    resumed = SNNetModule(**kw)
    inits = []
    resumed.net.init_stitching_layers = lambda x: inits.append(x)  # must not run again after a resume
    _, second = fit(resumed, tmp_path, 8, ckpt_path=tmp_path / "half.ckpt")
    assert first + second == full and len(full) == 8 and len(set(full)) > 2
    assert resumed.sampler.draws == 8 and inits == []
    loaded = SNNetModule.load_from_checkpoint(tmp_path / "half.ckpt")
    assert loaded.sampler.draws == 4 and loaded.hparams.two_way
    for k, v in loaded.net.stitch_layers.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)  # before Stitch, the network's weights were at `net.`
    ckpt["state_dict"] = {("net." + k[9:] if k.startswith("backbone.") else k): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = SNNetModule.load_from_checkpoint(tmp_path / "old.ckpt")  # strict: every weight found its place
    assert old.net.active == loaded.net.active and all(torch.equal(v, loaded.state_dict()[k]) for k, v in old.state_dict().items())


def test_fulltune_false_trains_only_stitching_layers_heads_and_cls_tokens(tmp_path):
    module = SNNetModule([anchor_spec(32), anchor_spec(16)], fulltune=False, lora_rank=2)
    anchors0 = {k: v.clone() for k, v in module.net.anchors.state_dict().items()}
    fit(module, tmp_path, 3)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("backbone.stitch_layers.", "backbone.heads.")) or n.endswith(".cls_token") for n in trained)
    assert not any(n.endswith(".weight") and "stitch_layers" in n for n in trained)  # LoRA: least-squares weight frozen
    for k, v in module.net.anchors.state_dict().items():
        if not k.endswith("cls_token"):  # the official fulltune=false trains the class tokens (issue 16, item 7)
            torch.testing.assert_close(v, anchors0[k])


def test_distillation_from_largest_anchor_matches_formula():
    torch.manual_seed(0)
    module = SNNetModule([anchor_spec(32), anchor_spec(16)], teacher="largest", distill_alpha=0.3, distill_temperature=2.0,
                         distill_type="soft")
    x, y = digits_batch(8)
    teacher_logits = module.net.heads[-1](module.net.anchors[-1](x)).detach()  # teacher = largest anchor before training
    # the one KD implementation of the zoo, with a frozen copy of the largest anchor outside the module's parameters
    kd_term = module.loss_term(SoftTargetKL)
    assert kd_term is not None and kd_term.teacher == "largest" and kd_term.weight == 0.3 and module.loss_term(CrossEntropy).weight == 0.7
    largest = pool_of(module).teachers["largest"].model
    assert not any(p.requires_grad for p in largest.parameters()) and not any(k.startswith("teacher") for k in module.state_dict())
    assert {id(p) for p in largest.parameters()}.isdisjoint(id(p) for p in module.parameters())
    module.train()
    loss, logits, _ = module.training_loss(Batch(x, y))
    torch.testing.assert_close(logits, module.net(x, module.last_stitch))
    p_t = F.softmax(teacher_logits / 2, -1)
    kd = (p_t * (p_t.log() - F.log_softmax(logits / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(loss, (0.7 * F.cross_entropy(logits, y) + 0.3 * kd).to(loss.dtype))
    saved = {k: v for k, v in module.hparams.items() if k in inspect.signature(SNNetModule).parameters}  # what load_from_checkpoint passes
    assert SNNetModule(**saved).loss_term(SoftTargetKL).temperature == 2.0


def test_ddp_ranks_use_the_same_stitch_every_step(tmp_path):  # sample_per_rank=false (official per-rank: tests/fidelity)
    anchors = json.dumps([anchor_spec(32), anchor_spec(16)])
    run_cli(["fit", "--model=zoo.snnet.SNNetModule", f"--model.anchors={anchors}", "--model.two_way=true", "--model.sample_per_rank=false",
             "--data=datamodules.Digits",
             "--data.batch_size=16", "--trainer.max_steps=5", "--trainer.limit_val_batches=1", "--trainer.logger=false",
             "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy=ddp_find_unused_parameters_true",
             "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.num_nodes=1",
             "--trainer.callbacks+=tests.zoo.test_snnet.RecordStitches", f"--trainer.callbacks.out_dir={tmp_path / 'rec'}",
             "--trainer.callbacks+=tests.helpers.SaveRankState", f"--trainer.callbacks.out_dir={tmp_path / 'out'}"],
            cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    states = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    seqs = [torch.load(tmp_path / "rec" / f"stitches{r}.pt") for r in range(2)]
    assert seqs[0] == seqs[1] and len(seqs[0]) == 5 and len(set(seqs[0])) > 1
    assert states[0]["global_step"] == states[1]["global_step"] == 5
    for k, v in states[0]["state_dict"].items():  # incl. stitching layers: least squares broadcast from rank 0
        torch.testing.assert_close(v, states[1]["state_dict"][k], msg=k)
    assert states[0]["state_dict"]["backbone.ls_initialized"].item()


def test_ddp_without_find_unused_parameters_fails_saying_what_to_set():
    """A DDP-wrapped SN-Net that does not look for unused parameters would fail mid-step: refused at fit start instead."""
    strategy = DDPStrategy()
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)  # no process group needed
    torch.nn.Module.__init__(ddp)
    ddp.find_unused_parameters = False
    strategy.model = ddp
    with pytest.raises(ValueError, match="trainer.strategy: ddp_find_unused_parameters_true.*find_unused_parameters: true"):
        check_find_unused(strategy)
    ddp.find_unused_parameters = True
    check_find_unused(strategy)
    check_find_unused(SimpleNamespace(model=torch.nn.Linear(2, 2)))  # not DDP: nothing to check


# -- bad inputs ----------------------------------------------------------------------------
def test_bad_inputs_fail_at_construction_with_clear_messages():
    heads = [torch.nn.Linear(32, 10), torch.nn.Linear(16, 10)]
    with pytest.raises(ValueError, match=r"anchor 1 \('cnn'.*not a stitchable block sequence"):
        StitchableNet([vit(32), build_backbone("zoo/convnet", in_chans=1)], heads, ["vit", "cnn"])
    with pytest.raises(ValueError, match=r"anchor 1 \('p4'\).*patch_size \(4, 4\).*same image size, patch size"):
        StitchableNet([vit(32), vit(16, patch_size=4)], heads, ["p2", "p4"])
    with pytest.raises(ValueError, match=r"anchor 1 \('deep'\) has 4 blocks.*interpolate_depth"):
        StitchableNet([vit(32), vit(16, 4)], heads, ["a", "deep"], interpolate_depth=False)
    with pytest.raises(ValueError, match="fewer than kernel_size=3"):
        StitchableNet([vit(32), vit(16)], heads, kernel_size=3)
    with pytest.raises(ValueError, match="at least 2 anchors"):
        StitchableNet([vit(32)], heads[:1])
    net = make_net()
    with pytest.raises(ValueError, match=rf"stitch 99 does not exist: valid ids are 0..{len(net) - 1}"):
        net.select(99)
    with pytest.raises(ValueError, match="valid ids"):
        net.extract(-1)
    with pytest.raises(ValueError, match="sampling='random'"):
        SNNetModule([anchor_spec(32), anchor_spec(16)], sampling="random")
    with pytest.raises(ValueError, match="expected a model name, a zoo .ckpt path, or a dict with keys"):
        SNNetModule([anchor_spec(32), {"model": TINY_VIT, "kwargs": {}}])
    with pytest.raises(ValueError, match="teacher='big'"):
        SNNetModule([anchor_spec(32), anchor_spec(16)], teacher="big")
    with pytest.raises(ValueError, match="name the teacher on its distillation term"):
        SNNetModule([anchor_spec(32), anchor_spec(16)], teacher="largest", losses=[CrossEntropy()])
    with pytest.raises(ValueError, match="valid ids are"):  # the stitches exist once configure_model has stitched the anchors
        SNNetModule([anchor_spec(32), anchor_spec(16)], eval_stitch=1000).configure_model()
    with pytest.raises(ValueError, match="eval_stitch=-1"):
        SNNetModule([anchor_spec(32), anchor_spec(16)], eval_stitch=-1)
    with pytest.raises(ValueError, match="kernel_size=0"):
        Stitch(kernel_size=0)
    with pytest.raises(TypeError, match="transforms zoo.snnet.Anchors.*already stitched"):
        Stitch()(net)
    with pytest.raises(TypeError, match="takes the StitchableNet"):
        Stitch().undo(vit(16))
    with pytest.raises(RuntimeError, match="apply zoo.snnet.Stitch"):
        Anchors([vit(16)], [torch.nn.Linear(16, 10)])(torch.randn(1, 1, 8, 8))
