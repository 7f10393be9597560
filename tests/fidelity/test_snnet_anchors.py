"""Issue 16 item 9: anchors beyond plain ViTs, ResNet and Swin from timm (tiny, built here, nothing downloaded).

Official (ziplab/SN-Net ``stitching_resnet_swin/timm/models/snnet.py``): stitch only inside stages 1 and 2 (not the
first nor the last), where both anchors' feature maps have one size, with 1x1-conv stitching layers; per stage, equal
depths give ``(j, j + 1)`` (``paired_stitching`` keeping ``j < k``), unequal depths every ``(j, k)``, ``0 < k``, ``j < k``,
whose nearest-interpolated front block is ``j`` (``unpaired_stitching``). Its result files list 10 stitches for
ResNet-18 + ResNet-50 and 8 for ResNet-18 + Swin-Ti; the same stage depths here give the same counts.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import Digits
from zoo.backbones import build_backbone
from zoo.snnet import SNNetModule, StitchableNet, StitchedViT, StitchingLayer

R18, R50, SWIN_T = (2, 2, 2, 2), (3, 4, 6, 3), (2, 2, 6, 2)  # stage depths of the official anchors


def official(front: tuple, end: tuple) -> list[tuple]:
    """(route, cuts) of the official stitches, block ids counted over the whole anchor (stage offset + block in stage)."""
    out = [((0,), ()), ((1,), ())]
    for s in (1, 2):
        d, nd = front[s], end[s]
        if d == nd:
            cfgs = [(j, k) for j in range(d) for k in range(d) if k == j + 1]
        else:
            mapped = [int(i * d / nd) for i in range(nd)]  # torch.nn.functional.interpolate, mode nearest
            cfgs = [(j, i) for j in range(d) for i in range(nd) if mapped[i] == j and j < i and i != 0]
        out += [((0, 1), ((sum(front[:s]) + j, sum(end[:s]) + k),)) for j, k in cfgs]
    return out


def resnet(layers: tuple, width: int) -> torch.nn.Module:
    return build_backbone("timm/test_resnet", in_chans=1, layers=layers, channels=(width, 2 * width, 2 * width, 4 * width), stem_width=8)


def swin(depths: tuple, width: int = 8) -> torch.nn.Module:
    return build_backbone("timm/swin_tiny_patch4_window7_224", img_size=32, in_chans=1, embed_dim=width, depths=depths,
                          num_heads=(1, 1, 1, 1), window_size=2, mlp_ratio=2.0)


def net_of(anchors: list[torch.nn.Module]) -> StitchableNet:
    return StitchableNet(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors])


@pytest.mark.parametrize("pair,count", [("r18-r50", 10), ("r18-swin", 8)])
def test_stitches_are_the_official_ones(pair, count):
    torch.manual_seed(0)
    anchors = [resnet(R18, 8), resnet(R50, 16) if pair == "r18-r50" else swin(SWIN_T)]
    net = net_of(anchors)
    ref = official(R18, R50 if pair == "r18-r50" else SWIN_T)
    assert len(ref) == count and sorted(s.key for s in net.stitches) == sorted(ref)
    for (f, e), positions in net.positions.items():
        for j, k, layer in positions:  # a 1x1 map from the front's channels at block j to the end's at block k
            assert net.layer(f, e, layer).in_layout == "NCHW" and net.layer(f, e, layer).out_layout == ("NCHW" if pair == "r18-r50" else "NHWC")
            assert net.layer_input(f, e, layer).shape[1] == net.layer(f, e, layer).weight.shape[1]  # what part_flops can count


@pytest.mark.parametrize("pair", ["r-r", "r-swin"])
def test_anchor_alone_is_the_model_and_a_stitch_is_its_parts(pair):
    torch.manual_seed(0)
    small, large = resnet((1, 1, 1, 1), 8), (resnet((1, 2, 3, 1), 16) if pair == "r-r" else swin((1, 2, 3, 1), 16))
    net = net_of([small, large]).eval()
    x = torch.randn(3, 1, 32, 32)
    for a in net.anchor_ids:
        assert torch.equal(net(x, a), net.heads[a](net.anchors[a](x)))
    s = next(s for s in net.stitches if s.kind == "sl" and s.cuts == ((2, 4),))  # stage 2: small block 0 -> large block 1 of 3
    h = small.maxpool(small.act1(small.bn1(small.conv1(x))))
    h = small.layer2[0](small.layer1[0](h))
    h = small.layer3[0](h)
    w, b = net.layer(0, 1, s.layers[0]).weight, net.layer(0, 1, s.layers[0]).bias
    h = F.conv2d(h, w[:, :, None, None], b)  # the stitching layer is a 1x1 conv
    if pair == "r-r":
        h = large.layer4(large.layer3[2](large.layer3[1](h)))
        ref = net.heads[1](large.forward_head(h))
    else:
        h = large.layers[3](large.layers[2].blocks[2](large.layers[2].blocks[1](h.permute(0, 2, 3, 1))))
        ref = net.heads[1](large.forward_head(large.norm(h)))
    torch.testing.assert_close(net(x, s.id), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pair", ["r-r", "r-swin"])
def test_stitch_trains_one_step_and_extracts_to_a_plain_network(pair):
    torch.manual_seed(0)
    anchors = [resnet((1, 1, 1, 1), 8), resnet((1, 2, 3, 1), 16) if pair == "r-r" else swin((1, 2, 3, 1), 16)]
    net = net_of(anchors)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    net.init_stitching_layers(x)
    s = next(s for s in net.stitches if s.kind == "sl" and s.cuts[0][0] > 1)
    layer = net.layer(0, 1, s.layers[0])
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net.train()(x, s.id), y).backward()
    unused = [n for n, p in net.stitch_layers.named_parameters() if p.grad is not None and n != f"0-1.{s.layers[0]}.weight"
              and n != f"0-1.{s.layers[0]}.bias"]
    assert layer.weight.grad is not None and not unused
    opt.step()
    assert not torch.equal(layer.weight, before)
    net.eval()
    every = net.forward_all(x)
    for t in net.stitches:
        plain = net.extract(t.id)
        assert type(plain) is StitchedViT and not any(isinstance(m, StitchingLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), net(x, t.id), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(every[t.id], net(x, t.id), atol=1e-5, rtol=1e-5)
    assert net.params(s.id) == sum(p.numel() for p in net.extract(s.id).parameters())


def test_module_fits_resnet_anchors_and_unloads_the_chosen_stitch(tmp_path):
    spec = lambda layers, w: {"model": "timm/test_resnet", "model_kwargs": {"in_chans": 1, "layers": layers,  # noqa: E731
                                                                            "channels": [w, 2 * w, 2 * w, 4 * w], "stem_width": 8}}
    module = SNNetModule([spec([1, 1, 1, 1], 8), spec([1, 2, 3, 1], 16)])
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, Digits(batch_size=16))
    assert bool(module.net.ls_initialized) and len(module.net) == 5
    module.select_stitch(4)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = module.eval()(x)
        torch.testing.assert_close(module.unload_surgery()(x), ref, atol=1e-5, rtol=1e-5)


def test_unsupported_combinations_fail_clearly():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="two_way stitching needs ViT anchors"):
        StitchableNet([resnet((1, 1, 1, 1), 8), resnet((1, 2, 2, 1), 16)], [torch.nn.Linear(32, 10), torch.nn.Linear(64, 10)], two_way=True)


@pytest.mark.parametrize("pair", ["r-r", "r-swin"])
def test_stitch_costs_equal_the_counter_on_the_extracted_network(pair):
    """``flops``/``macs`` add up per-part counts; each must equal the whole extracted stitch counted at once."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = net_of([resnet((1, 1, 1, 1), 8), resnet((1, 2, 3, 1), 16) if pair == "r-r" else swin((1, 2, 3, 1), 16)]).eval()
    for s in net.stitches:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.extract(s.id)(net.example_input())
        assert net.flops(s.id) == counter.get_total_flops() and net.macs(s.id) == counter.get_total_flops() // 2
