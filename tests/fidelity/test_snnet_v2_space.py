"""Issue 16 item 1: SN-Netv2's stitch space, as the official ``get_stitch_configs_bidirection`` (ziplab/SN-Netv2,
``classification/snnet.py``) enumerates it, written here by hand from that code and compared with ours.

Official, anchors of depths ``d0 <= d1``: small -> large at ``(i, (i + 1) * (d1 // d0))`` for every ``i < d0``, one
stitching layer each, the last one (``i == d0 - 1``) left out of the sampled stitches; large -> small at
``(i, interp(i) + 1)`` for odd ``i < d1 - 1`` (every ``i < d1 - 1`` at equal depths); chains keep the second stitch's
front block at or after the first's end block. DeiT3-S (12 blocks) with DeiT3-L (24): 134 stitches.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import build_backbone
from zoo.snnet import Stitch, StitchableNet
from zoo.snnet.surgery import Anchors


def official_v2(d0: int, d1: int) -> list[tuple]:
    """(route, cuts) of every sampled official stitch (anchor 0: small, 1: large)."""
    interp = [i * d0 // d1 for i in range(d1)]  # torch nearest interpolation of range(d0) to d1 entries
    sl = [((0, 1), (i, (i + 1) * (d1 // d0))) for i in range(d0)]
    ls = [((1, 0), (i, interp[i] + 1)) for i in range(d1) if i < d1 - 1 and (d1 == d0 or i % 2 == 1)]
    lsl = [((1, 0, 1), (a[1], b[1])) for a in ls for b in sl if b[1][0] != d0 - 1 and b[1][0] >= a[1][1]]
    sls = [((0, 1, 0), (a[1], b[1])) for a in sl for b in ls if b[1][0] >= a[1][1]]
    sampled_sl = [s for s in sl if s[1][0] != d0 - 1]  # official: `if comb_id == [0, 1] and front != 11`
    one = [(route, (cut,)) for route, cut in sampled_sl + ls]
    return [((0,), ()), ((1,), ())] + one + lsl + sls


def vit(width: int, depth: int) -> torch.nn.Module:
    return build_backbone(TINY_VIT, **{**TINY_VIT_KWARGS, "embed_dim": width, "depth": depth, "num_heads": 1})


def stitched(depths: tuple[int, int], **kw) -> StitchableNet:
    anchors = [vit(8, depths[0]), vit(16, depths[1])]
    return Stitch(**kw)(Anchors(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors]))


@pytest.mark.parametrize("depths,count", [((12, 24), 134), ((12, 12), 134), ((6, 12), 32)])
def test_v2_space_is_the_official_enumeration(depths, count):
    net = stitched(depths, two_way=True)  # space defaults to v2 with two_way
    ref = official_v2(*depths)
    assert len(ref) == count and net.space == "v2"
    assert sorted(s.key for s in net.stitches) == sorted((tuple(r), tuple(tuple(c) for c in cuts)) for r, cuts in ref)
    # one stitching layer per position: every (direction, position) has a layer of its own
    for (f, e), pos in net.positions.items():
        assert sorted(layer for _, _, layer in pos) == list(range(len(net.stitch_layers[f"{f}-{e}"])))


def test_ours_is_kept_as_space_v1():
    """Our windowed space with window-shared layers (more stitches), available as ``space: v1``."""
    assert len(stitched((12, 24), two_way=True, space="v1")) == 324
    assert len(stitched((12, 12), two_way=True, space="v1")) == 180
    one_way = stitched((12, 24), space="v2")  # v2 positions, SL only (official include_ls/lsl/sls false)
    assert len(one_way) == 2 + 11 and {s.kind for s in one_way.stitches} == {"anchor", "sl"}


def test_v2_stitch_runs_the_official_route():
    """Official ls cfg (9, 5) at depths 6/12: L runs blocks 0..9, the stitching layer, then S its block 5 only."""
    net = stitched((6, 12), two_way=True).eval()
    s = next(s for s in net.stitches if s.kind == "ls" and s.cuts == ((9, 5),))
    x = torch.randn(2, 1, 8, 8)
    small, large = net.anchors[0], net.anchors[1]
    h = large.norm_pre(large.patch_drop(large._pos_embed(large.patch_embed(x))))
    for blk in large.blocks[:10]:
        h = blk(h)
    h = small.blocks[5](net.layer(1, 0, s.layers[0])(h))
    torch.testing.assert_close(net(x, s.id), net.heads[0](small.forward_head(small.norm(h))))
