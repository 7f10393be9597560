"""The stitch space: where two anchors may be stitched and which paths through the anchors are stitches.

Positions are ``(j, k, layer)``: the front anchor's output of block ``j`` enters the end anchor's block ``k``
through stitching layer ``layer`` of that direction. Three rules, each the official one of its code base:

* ``v1`` (SN-Net, ``stitching_deit/utils.py: paired_stitching``): a window of ``kernel_size`` block ids slides by
  ``stride``; every pair inside a window is a position and the positions first seen in a window share a layer.
* ``v2`` (SN-Netv2, ``classification/snnet.py: get_stitch_configs_bidirection``): aligned positions, one layer each:
  shallower -> deeper ``(i, (i + 1) * (d1 // d0))`` for ``i < d0 - 1``; deeper -> shallower only from the deeper
  anchor's blocks ending a group of ``d1 // d0`` (odd ``i`` at 12/24), ``(i, i * d0 // d1 + 1)``.
* stages (SN-Net ``stitching_resnet_swin/timm/models/snnet.py``), for anchors with several stages (ResNet, Swin):
  only inside a stage whose feature maps have the same size in both anchors, never the first or last stage;
  equal stage depths: ``(j, j + 1)``; else every ``(j, k)``, ``k > j``, whose interpolated front block is ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

SPACES = ("v1", "v2")
Position = tuple[int, int, int]


@dataclass(frozen=True)
class StitchPath:
    """One path through the anchors.

    ``route`` lists the anchors in data-flow order; leg ``i`` takes the output of block ``j`` of
    ``route[i]`` into the input of block ``k`` of ``route[i + 1]`` (``cuts[i] == (j, k)``) through
    stitching layer ``layers[i]`` of that direction. An anchor alone has one entry in ``route``.
    """

    id: int
    kind: str
    route: tuple[int, ...]
    cuts: tuple[tuple[int, int], ...]
    layers: tuple[int, ...]
    description: str

    @property
    def key(self) -> tuple:
        return self.route, self.cuts


def map_block(k: int, front_depth: int, end_depth: int) -> int:
    """Block id ``k`` of a ``front_depth``-block anchor mapped onto an ``end_depth``-block one (nearest interpolation)."""
    return min(end_depth, (k * end_depth) // front_depth)


def window_positions(front_depth: int, end_depth: int, kernel_size: int = 2, stride: int = 1) -> list[Position]:
    """SN-Net's (v1) stitching positions: every pair ``(j, k)`` inside a window of ``kernel_size`` block ids sliding by
    ``stride`` (``k`` mapped to the end anchor's depth; the last windows are cut at the last block, as the official
    ``paired_stitching``); the positions first seen in a window share one layer. Depth 12, kernel 2: 34 positions, 11 layers."""
    positions, seen, layer = [], set(), 0
    for start in range(0, front_depth, stride):
        new = False
        for j in range(start, min(start + kernel_size, front_depth)):
            for k in range(start, min(start + kernel_size, front_depth)):
                pos = (j, map_block(k, front_depth, end_depth))
                if pos not in seen:
                    seen.add(pos)
                    positions.append((*pos, layer))
                    new = True
        layer += new
    return positions


def v2_positions(front_depth: int, end_depth: int) -> list[Position]:
    """SN-Netv2's aligned positions, one stitching layer each (see the module docstring)."""
    if front_depth <= end_depth:
        ratio = end_depth // front_depth
        return [(i, (i + 1) * ratio, i) for i in range(front_depth - 1)]
    group = max(2, front_depth // end_depth)  # official: odd i (2 deep blocks per shallow one at 12/24)
    ids = [i for i in range(front_depth - 1) if (i + 1) % group == 0]
    return [(i, map_block(i, front_depth, end_depth) + 1, n) for n, i in enumerate(ids)]


def stage_positions(front_stages: list[int], end_stages: list[int], same_size: list[bool]) -> list[Position]:
    """Official ResNet/Swin positions (flat block ids) between anchors with stage depths ``front_stages`` / ``end_stages``;
    ``same_size[s]``: stage ``s`` has feature maps of the same size in both. One layer per front block of a stage
    (the official code allocates as many; its zip with the interpolation table shares some, a quirk not kept)."""
    positions, layer = [], 0
    offsets_f = [sum(front_stages[:s]) for s in range(len(front_stages))]
    offsets_e = [sum(end_stages[:s]) for s in range(len(end_stages))]
    for s in range(1, min(len(front_stages), len(end_stages)) - 1):
        if not same_size[s]:
            continue
        df, de = front_stages[s], end_stages[s]
        if df == de:
            local = [(j, j + 1, j) for j in range(df - 1)]
        else:
            mapped = [min(df - 1, i * df // de) for i in range(de)]  # front block each end block interpolates to
            local = [(j, k, j) for j in range(df) for k in range(1, de) if mapped[k] == j and j < k]
        positions += [(offsets_f[s] + j, offsets_e[s] + k, layer + lj) for j, k, lj in local]
        layer += df
    ids = {}  # numbered from 0 without gaps (a front block with no position has no layer)
    return [(j, k, ids.setdefault(lj, len(ids))) for j, k, lj in positions]


def pairs_of(n_anchors: int, nearest: bool) -> list[tuple[int, int]]:
    """Anchor pairs (smaller first) that get stitching layers: neighbours in size only (``nearest``, the official default),
    or every pair (official ``nearest_stitching: false``, e.g. Ti -> B skipping S)."""
    return [(a, a + 1) for a in range(n_anchors - 1)] if nearest else list(combinations(range(n_anchors), 2))


def enumerate_stitches(n_anchors: int, positions: dict, chain_positions: dict, two_way: bool, nearest: bool,
                       describe) -> list[StitchPath]:
    """Every stitch: the anchors, then per pair the one-way stitches (``sl``); with ``nearest=False`` the official
    three-anchor paths small -> medium -> large (``sml``, any positions with the middle anchor running >= 1 block);
    with ``two_way`` the reverse stitches (``ls``) and chains ``sls`` / ``lsl`` over ``chain_positions``."""
    pairs = pairs_of(n_anchors, nearest)
    specs: list[tuple[str, tuple, tuple, tuple]] = [("anchor", (a,), (), ()) for a in range(n_anchors)]
    for f, e in pairs:
        specs += [("sl", (f, e), ((j, k),), (layer,)) for j, k, layer in positions[(f, e)]]
    if not nearest:
        for a, b, c in combinations(range(n_anchors), 3):
            specs += [("sml", (a, b, c), ((j1, k1), (j2, k2)), (l1, l2))
                      for j1, k1, l1 in positions[(a, b)] for j2, k2, l2 in positions[(b, c)] if j2 >= k1]
    if two_way:
        for f, e in pairs:
            specs += [("ls", (e, f), ((j, k),), (layer,)) for j, k, layer in positions[(e, f)]]
        for kind, (a, b) in (("sls", (0, 1)), ("lsl", (1, 0))):
            for f, e in pairs:
                first, second = (f, e)[a], (f, e)[b]
                for j1, k1, l1 in chain_positions[(first, second)]:
                    for j2, k2, l2 in chain_positions[(second, first)]:
                        if j2 >= k1:  # the middle anchor runs at least one block
                            specs.append((kind, (first, second, first), ((j1, k1), (j2, k2)), (l1, l2)))
    return [StitchPath(i, kind, route, cuts, layers, describe(route, cuts)) for i, (kind, route, cuts, layers) in enumerate(specs)]
