"""Issue 16 item 8: non-nearest stitching, the official ``nearest_stitching`` switch of SN-Net (ziplab/SN-Net,
``stitching_deit/utils.py: get_stitch_configs``, default ``true``), enumerated here by hand from that code.

Official, 3 anchors (Ti, S, B): every subset of anchors in size order is a configuration; ``nearest_stitching`` drops
Ti-B and Ti-S-B. A pair takes every windowed position; Ti-S-B every two positions whose second front block is at or
after the first's end block. Ours: ``nearest`` (default ``True``); ``False`` adds every pair and the ``sml`` paths.
"""

from __future__ import annotations

from itertools import combinations

import pytest
import torch

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import build_backbone
from zoo.snnet import Stitch, StitchableNet
from zoo.snnet.surgery import Anchors


def official_paired(depth: int, kernel: int, stride: int) -> list[tuple[int, int]]:
    cfgs, i = [], 0
    while i < depth:
        ids = list(range(depth))[i:i + kernel]
        cfgs += [(j, k) for j in ids for k in ids if (j, k) not in cfgs]
        i += stride
    return cfgs


def official_v1(n: int, depth: int, kernel: int, stride: int, nearest: bool) -> list[tuple]:
    cfgs = official_paired(depth, kernel, stride)
    combos = [c for size in range(1, n + 1) for c in combinations(range(n), size)]
    if nearest:
        combos.remove((0, 2))
        combos.remove((0, 1, 2))
    out = []
    for comb in combos:
        if len(comb) == 1:
            out.append((comb, ()))
        elif len(comb) == 2:
            out += [(comb, (c,)) for c in cfgs]
        else:
            out += [(comb, (c, d)) for c in cfgs for d in cfgs if d[0] >= c[1]]
    return out


def vit(width: int, depth: int) -> torch.nn.Module:
    return build_backbone(TINY_VIT, **{**TINY_VIT_KWARGS, "embed_dim": width, "depth": depth, "num_heads": 1})


def stitched(depth: int, **kw) -> StitchableNet:
    torch.manual_seed(0)
    anchors = [vit(w, depth) for w in (8, 16, 24)]
    return Stitch(**kw)(Anchors(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors]))


@pytest.mark.parametrize("nearest,kernel,stride,count", [(True, 2, 1, 71), (False, 2, 1, 732), (False, 3, 2, None)])
def test_stitches_are_the_official_configs(nearest, kernel, stride, count):
    net = stitched(12, nearest=nearest, kernel_size=kernel, stride=stride)
    ref = official_v1(3, 12, kernel, stride, nearest)
    assert count is None or len(ref) == count
    assert sorted(s.key for s in net.stitches) == sorted(ref)
    pairs = {(0, 1), (1, 2)} if nearest else {(0, 1), (0, 2), (1, 2)}
    assert {tuple(map(int, k.split("-"))) for k in net.stitch_layers} == pairs
    assert net.nearest is nearest and Stitch().nearest  # official default: nearest


def test_non_nearest_paths_run_and_extract():
    net = stitched(2, nearest=False).eval()
    x = torch.randn(3, 1, 8, 8)
    ti_b = next(s for s in net.stitches if s.route == (0, 2) and s.cuts == ((0, 1),))  # Ti block 0 -> B block 1
    ti, b = net.anchors[0], net.anchors[2]
    h = ti.blocks[0](ti.norm_pre(ti.patch_drop(ti._pos_embed(ti.patch_embed(x)))))
    ref = net.heads[2](b.forward_head(b.norm(b.blocks[1](net.layer(0, 2, ti_b.layers[0])(h)))))
    torch.testing.assert_close(net(x, ti_b.id), ref)
    every = net.forward_all(x)
    for s in net.stitches:
        if s.kind in ("sl", "sml"):
            torch.testing.assert_close(every[s.id], net(x, s.id), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(net.extract(s.id)(x), net(x, s.id), atol=1e-5, rtol=1e-5)
    assert any(s.kind == "sml" and s.route == (0, 1, 2) for s in net.stitches)
