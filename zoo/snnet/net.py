"""StitchableNet: one network holding every stitch of a family of ViT anchors (SN-Net / SN-Netv2)."""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zoo import families, sharding
from zoo.snnet import parts
from zoo.snnet.layers import (
    FLOP_MAPPING,
    StitchPath,
    StitchedViT,
    StitchingLayer,
    anchor_blocks,
    anchor_label,
    check_anchor,
    shape_info,
    shell,
    embed,
    finish,
    least_squares,
    map_block,
)
from zoo.snnet.parts import channels_last, from_channels_last, input_shape, probe, same_size_stages, stage_depths, unit_entries, units_of
from zoo.snnet.space import SPACES, enumerate_stitches, pairs_of, stage_positions, v2_positions, window_positions

class StitchableNet(nn.Module):
    """SN-Net / SN-Netv2 over a family of anchors (sorted here from smallest to largest): ViTs, or ResNets / Swins.

    The anchors' blocks are read where :mod:`zoo.families` says they are; anchors of another family fail. ViTs stitch
    at the positions of ``space``; ResNet / Swin anchors (several stages) at the official stage-wise positions
    (:func:`~zoo.snnet.space.stage_positions`, one way only; ``kernel_size``, ``stride``, ``space`` unused).

    Args:
        anchors: timm ViT-like backbones (``num_classes=0``), in any order.
        heads: one classification head per anchor (same order as ``anchors``).
        names: labels of the anchors for the stitch descriptions and errors.
        kernel_size: size of the sliding window over block ids.
        stride: step of the sliding window.
        two_way: SN-Netv2: also stitch large->small, small->large->small and large->small->large.
        interpolate_depth: map anchors of different depth block to block by interpolation
            (``False``: anchors of different depth are an error).
        lora_rank: SN-Netv2's low-rank stitching-layer updates (0: plain linear stitching layers).
        lora_alpha: LoRA scaling numerator (update scaled by ``lora_alpha / lora_rank``).
        space: stitching positions (:mod:`zoo.snnet.space`): ``v1`` (SN-Net's windows, layers shared per window),
            ``v2`` (SN-Netv2's aligned positions, one layer each); default: the official space of the chosen version,
            ``v2`` with ``two_way`` and ``v1`` without.
        nearest: stitch only anchors of neighbouring size (official default); ``False``: every pair (e.g. Ti -> B) and
            the three-anchor paths small -> medium -> large (official ``nearest_stitching: false``).
    """

    def __init__(
        self,
        anchors: list[nn.Module],
        heads: list[nn.Module],
        names: list[str] | None = None,
        kernel_size: int = 2,
        stride: int = 1,
        two_way: bool = False,
        interpolate_depth: bool = True,
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
        space: str | None = None,
        nearest: bool = True,
    ):
        super().__init__()
        if len(anchors) < 2:
            raise ValueError(f"SN-Net needs at least 2 anchors, got {len(anchors)}")
        order = sorted(range(len(anchors)), key=lambda i: sum(p.numel() for p in anchors[i].parameters()))
        names = list(names) if names is not None else [f"A{order.index(i)}" for i in range(len(anchors))]
        if not len(anchors) == len(heads) == len(names):
            raise ValueError(f"got {len(anchors)} anchors, {len(heads)} heads and {len(names)} names: one of each per anchor")
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size={kernel_size}, stride={stride}: both must be positive integers")
        if lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank}: expected 0 (plain stitching layers) or a positive integer")
        space = space if space is not None else ("v2" if two_way else "v1")
        if space not in SPACES:
            raise ValueError(f"space={space!r}: expected one of {SPACES} (or null: v2 with two_way, v1 without)")
        input_shape = self._check_anchors(anchors, names, interpolate_depth, kernel_size)
        self.anchors = nn.ModuleList(anchors[i] for i in order)
        self.heads = nn.ModuleList(heads[i] for i in order)
        self.names = [anchor_label(names[i], anchors[i]) for i in order]
        self.kernel_size, self.stride, self.two_way, self.space, self.nearest = kernel_size, stride, two_way, space, nearest
        # where each anchor's blocks are, asked of zoo.families once (the forward passes look them up by name)
        self.block_names = [[n for n, _ in families.blocks(b)] for b in self.anchors]
        self.depths = [len(names) for names in self.block_names]
        self.entries = [unit_entries(b) for b in self.anchors]  # Swin: each stage's downsample runs with its first block
        self.layouts = [parts.family(b).layout for b in self.anchors]
        self.input_shape = input_shape
        staged = any(layout != "NLC" for layout in self.layouts)  # ResNet / Swin: the official stage-wise positions
        if staged and two_way:
            raise ValueError("two_way stitching needs ViT anchors: ResNet / Swin anchors stitch one way, inside a stage (official)")
        shapes = [probe(b, torch.zeros(1, *input_shape)) for b in self.anchors]

        pairs = pairs_of(len(self.anchors), nearest)
        directions = pairs + ([(e, f) for f, e in pairs] if two_way else [])
        self.positions: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self.stitch_layers = nn.ModuleDict()
        self._layer_shapes: dict[tuple[int, int, int], tuple[int, ...]] = {}  # channels-last input shape of each layer
        for f, e in directions:
            df, de = self.depths[f], self.depths[e]
            if staged:
                same = same_size_stages(self.anchors[f], self.anchors[e], shapes[f], shapes[e])
                pos = stage_positions(stage_depths(self.anchors[f]), stage_depths(self.anchors[e]), same)
            else:
                pos = window_positions(df, de, kernel_size, stride) if space == "v1" else v2_positions(df, de)
            if not pos:
                raise ValueError(f"anchors {self.names[f]} and {self.names[e]} have no stitching position "
                                 + ("(stages 1..n-2 with feature maps of one size in both)" if staged else f"in space {space!r}"))
            self.positions[(f, e)] = pos
            dims = {layer: (shapes[f][j + 1][-1], shapes[e][k][-1]) for j, k, layer in reversed(pos)}  # from a layer's first position
            self._layer_shapes.update({(f, e, layer): shapes[f][j + 1] for j, k, layer in reversed(pos)})
            self.stitch_layers[f"{f}-{e}"] = nn.ModuleList(StitchingLayer(*dims[i], lora_rank, lora_alpha, self.layouts[f], self.layouts[e])
                                                           for i in range(max(dims) + 1))
        self._layer_index = {(f, e, j, k): layer for (f, e), pos in self.positions.items() for j, k, layer in pos}
        self.stitches = enumerate_stitches(len(self.anchors), self.positions, {d: self._chain_positions(*d) for d in directions}, two_way,
                                           nearest, self._describe)
        self.active = len(self.anchors) - 1
        self.register_buffer("ls_initialized", torch.tensor(False))
        self._flops: list[int] | None = None

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def _check_anchors(anchors: list[nn.Module], names: list[str], interpolate_depth: bool, kernel_size: int) -> tuple[int, ...]:
        """Fail on anchors that cannot be stitched; the input shape ``(C, H, W)`` the stitches take."""
        for i, (b, name) in enumerate(zip(anchors, names)):
            check_anchor(b, f"anchor {i} ({name!r}, {type(b).__name__})")
            if len(anchor_blocks(b)) < kernel_size:
                raise ValueError(f"anchor {i} ({name!r}) has {len(anchor_blocks(b))} blocks, fewer than kernel_size={kernel_size}")
        vits = all(parts.family(b).name == "vit" for b in anchors)
        fixed = [input_shape(b) for b in anchors if getattr(getattr(b, "patch_embed", None), "img_size", None) is not None]
        ref = shape_info(anchors[0]) if vits else None
        for i, (b, name) in enumerate(zip(anchors, names)):
            info = shape_info(b) if vits else None
            if info != ref:
                raise ValueError(
                    f"anchor {i} ({name!r}) has img_size {info[0]}, patch_size {info[1]}, in_chans {info[2]}, {info[3]} prefix tokens, "
                    f"but anchor 0 ({names[0]!r}) has {ref[0]}, {ref[1]}, {ref[2]}, {ref[3]}: stitching maps tokens one to one, "
                    "so all anchors need the same image size, patch size (token count), input channels and prefix tokens"
                )
            depth, depth0 = len(anchor_blocks(b)), len(anchor_blocks(anchors[0]))
            if not interpolate_depth and depth != depth0:
                raise ValueError(
                    f"anchor {i} ({name!r}) has {depth} blocks but anchor 0 ({names[0]!r}) has {depth0}: "
                    "with interpolate_depth=false all anchors need the same depth (set interpolate_depth=true to map blocks by interpolation)"
                )
        if len(set(fixed)) > 1:
            raise ValueError(f"anchors with fixed input sizes disagree: {fixed} (C, H, W); stitching needs one input size")
        return fixed[0] if fixed else input_shape(anchors[0])

    def _describe(self, route: tuple[int, ...], cuts: tuple[tuple[int, int], ...]) -> str:
        parts, start = [], 0
        for a, (j, k) in zip(route, cuts):
            parts.append(f"{self.names[a]}[{start}:{j + 1}]")
            start = k
        parts.append(f"{self.names[route[-1]]}[{start}:{self.depths[route[-1]]}]")
        return " -> ".join(parts)

    def _chain_positions(self, f: int, e: int) -> list[tuple[int, int, int]]:
        """The positions two-way chains use: v2's all; v1's with no block skipped or repeated (front block j -> end block j+1)."""
        if self.space == "v2":
            return self.positions[(f, e)]
        df, de = self.depths[f], self.depths[e]
        return [(j, k, layer) for j, k, layer in self.positions[(f, e)] if k == map_block(j + 1, df, de) and k < de]

    # -- selection ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.stitches)

    def _check(self, stitch: int) -> int:
        if isinstance(stitch, bool) or not isinstance(stitch, int) or not 0 <= stitch < len(self.stitches):
            raise ValueError(f"stitch {stitch!r} does not exist: valid ids are 0..{len(self.stitches) - 1} ({len(self.stitches)} stitches, see describe())")
        return stitch

    def select(self, stitch: int) -> None:
        """Make ``stitch`` the one ``forward`` runs (instant: nothing is rebuilt)."""
        self.active = self._check(stitch)

    @property
    def anchor_ids(self) -> list[int]:
        return [s.id for s in self.stitches if s.kind == "anchor"]

    # -- forward ------------------------------------------------------------------------
    def layer(self, front: int, end: int, index: int) -> StitchingLayer:
        return self.stitch_layers[f"{front}-{end}"][index]

    def blocks(self, anchor: int) -> list[nn.Module]:
        """The blocks of anchor ``anchor`` in forward order (names found once, at construction)."""
        return units_of(self.anchors[anchor], self.block_names[anchor], self.entries[anchor])

    def forward(self, x: torch.Tensor, stitch: int | None = None) -> torch.Tensor:
        s = self.stitches[self.active if stitch is None else self._check(stitch)]
        h = embed(self.anchors[s.route[0]], x)
        start = 0
        for i, ((j, k), layer) in enumerate(zip(s.cuts, s.layers)):
            blocks = self.blocks(s.route[i])
            for b in range(start, j + 1):
                h = blocks[b](h)
            h = self.layer(s.route[i], s.route[i + 1], layer)(h)
            start = k
        end = s.route[-1]
        blocks = self.blocks(end)
        for b in range(start, self.depths[end]):
            h = blocks[b](h)
        return finish(self.anchors[end], self.heads[end], h)

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, stitches: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Logits of many stitches (default all) on ``x``, each shared prefix computed once.

        The stitches form a prefix tree (anchor blocks, then a stitching layer, then the next anchor's
        blocks...); a depth-first walk runs every node once and branches off at each stitching
        position, so the cost is the size of the tree rather than the sum of all paths, and only one
        path of activations is alive at a time. Sharded (FSDP2), the net's own parameters are gathered for the call
        (it runs outside ``forward``): every rank must call it as many times.
        """
        with sharding.unsharded(self):
            return self._forward_all(x, stitches)

    def _forward_all(self, x: torch.Tensor, stitches: list[int] | None) -> dict[int, torch.Tensor]:
        ids = list(range(len(self.stitches))) if stitches is None else [self._check(i) for i in stitches]
        wanted = {self.stitches[i].key: i for i in ids}
        children: dict[tuple, dict[int, list[tuple]]] = defaultdict(lambda: defaultdict(list))
        for i in ids:
            route, cuts = self.stitches[i].key
            for level in range(1, len(route)):
                parent, child = (route[:level], cuts[:level - 1]), (route[:level + 1], cuts[:level])
                if child not in children[parent][cuts[level - 1][0]]:
                    children[parent][cuts[level - 1][0]].append(child)
        out: dict[int, torch.Tensor] = {}
        for root in dict.fromkeys(((self.stitches[i].route[0],), ()) for i in ids):
            self._walk(root, embed(self.anchors[root[0][0]], x), 0, children, wanted, out)
        return out

    def _layer_of(self, front: int, end: int, j: int, k: int) -> StitchingLayer:
        return self.layer(front, end, self._layer_index[(front, end, j, k)])

    def _walk(self, key: tuple, h: torch.Tensor, start: int, children: dict, wanted: dict, out: dict) -> None:
        """Run ``key``'s last anchor from block ``start``, branching into every child stitch at its cut."""
        route = key[0]
        anchor, branches = route[-1], children.get(key, {})
        blocks = self.blocks(anchor)
        for b in range(start, self.depths[anchor]):
            h = blocks[b](h)
            for child in branches.get(b, ()):
                j, k = child[1][-1]
                self._walk(child, self._layer_of(anchor, child[0][-1], j, k)(h), k, children, wanted, out)
        if key in wanted:
            out[wanted[key]] = finish(self.anchors[anchor], self.heads[anchor], h)

    # -- least-squares init -------------------------------------------------------------
    @torch.no_grad()
    def block_inputs(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per anchor, the tokens / feature maps (channels last) entering each block and, last, leaving the last block."""
        feats = []
        for a, b in enumerate(self.anchors):
            h = embed(b, x)
            hs = [channels_last(h, self.layouts[a])]
            for blk in self.blocks(a):
                h = blk(h)
                hs.append(channels_last(h, self.layouts[a]))
            feats.append(hs)
        return feats

    @torch.no_grad()
    def init_stitching_layers(self, x: torch.Tensor, train: bool = False) -> None:
        """Least-squares init of every stitching layer from one batch of inputs ``x``.

        For position ``(j, k)`` solve ``[X 1] W = Y`` with ``X`` the front anchor's output of block ``j``
        and ``Y`` the end anchor's input of block ``k`` (tokens flattened); a layer shared by several
        positions takes the mean of their solutions. ``train``: the anchors run in train mode (dropout, drop
        path), as the official code takes the features (SN-Net ``main.py``); default eval mode.

        Float32 under mixed precision: the features come from a float32 forward pass with autocast off (the official
        code solves before its ``torch.cuda.amp.autocast`` training loop, ``main.py`` / ``engine.py``), the solve runs in
        float64 (:func:`~zoo.snnet.layers.least_squares`; official: ``torch.linalg.pinv`` in float32, ``utils.ps_inv``)
        and the float32 layers take the solution.
        """
        was_training = self.training
        self.train(train)
        with torch.autocast(device_type=x.device.type, enabled=False):
            feats = self.block_inputs(x)
        for (f, e), positions in self.positions.items():
            solutions = defaultdict(list)
            for j, k, layer in positions:
                solutions[layer].append(least_squares(feats[f][j + 1], feats[e][k]))
            for layer, sols in solutions.items():
                target = self.layer(f, e, layer)
                target.weight.copy_(torch.stack([w for w, _ in sols]).mean(0))
                target.bias.copy_(torch.stack([b for _, b in sols]).mean(0))
                if target.rank:
                    target.lora_b.zero_()
        self.ls_initialized.fill_(True)
        self.train(was_training)

    # -- cost ---------------------------------------------------------------------------
    def example_input(self, batch: int = 1) -> torch.Tensor:
        p = next(self.parameters())
        return torch.zeros(batch, *self.input_shape, device=p.device, dtype=p.dtype)

    def layer_input(self, front: int, end: int, index: int, batch: int = 1) -> torch.Tensor:
        """Zeros shaped as what stitching layer ``index`` of ``front -> end`` takes for one image (tokens or feature maps)."""
        p = next(self.parameters())
        x = torch.zeros(batch, *self._layer_shapes[(front, end, index)], device=p.device, dtype=p.dtype)
        return from_channels_last(x, self.layouts[front])

    @torch.no_grad()
    def part_flops(self) -> dict:
        """FLOPs of one image through each part (``("embed", a)``, ``("block", a, i)``, ``("layer", f, e, i)``, ``("finish", a)``)."""
        def count(fn, *args):
            with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
                result = fn(*args)
            return counter.get_total_flops(), result

        was_training = self.training
        self.eval()
        parts, x = {}, self.example_input()
        for a, b in enumerate(self.anchors):
            parts[("embed", a)], h = count(embed, b, x)
            for i, blk in enumerate(self.blocks(a)):
                parts[("block", a, i)], h = count(blk, h)
            parts[("finish", a)], _ = count(finish, b, self.heads[a], h)
        for key, layers in self.stitch_layers.items():
            f, e = map(int, key.split("-"))
            for i, layer in enumerate(layers):  # as deployed: one linear map, LoRA merged
                parts[("layer", f, e, i)], _ = count(layer.to_linear(), self.layer_input(f, e, i))
        self.train(was_training)
        return parts

    def stitch_parts(self, s: StitchPath) -> list[tuple]:
        """The parts (see :meth:`part_flops`) that stitch ``s`` runs, in order."""
        parts, start = [("embed", s.route[0])], 0
        for i, ((j, k), layer) in enumerate(zip(s.cuts, s.layers)):
            parts += [("block", s.route[i], b) for b in range(start, j + 1)]
            parts.append(("layer", s.route[i], s.route[i + 1], layer))
            start = k
        parts += [("block", s.route[-1], b) for b in range(start, self.depths[s.route[-1]])]
        return parts + [("finish", s.route[-1])]

    def flops(self, stitch: int | None = None) -> int | list[int]:
        """FLOPs of one image through ``stitch`` (``torch.utils.flop_counter``: 2 per multiply-add); all stitches if ``None``.

        The papers' "FLOPs" are multiply-adds (fvcore): see :meth:`macs`, half of these."""
        if self._flops is None:
            part = self.part_flops()
            self._flops = [sum(part[p] for p in self.stitch_parts(s)) for s in self.stitches]
        return list(self._flops) if stitch is None else self._flops[self._check(stitch)]

    def macs(self, stitch: int | None = None) -> int | list[int]:
        """Multiply-adds of one image through ``stitch`` (all stitches if ``None``): the unit of the SN-Net papers' "FLOPs".

        Exactly ``flops // 2`` (every op the counter sees -- linear, conv, attention matmuls -- costs 2 FLOPs per
        multiply-add). The official code counts with fvcore, which also adds 5 per LayerNorm element:
        ``macs + 5 * tokens * width * (2 * depth + 1)`` is fvcore's figure for a plain ViT (+0.2% on DeiT-S).
        """
        flops = self.flops(stitch)
        return [f // 2 for f in flops] if stitch is None else flops // 2

    def _modules_of(self, s: StitchPath) -> list[nn.Module]:
        mods, blocks = [], [self.blocks(a) for a in range(len(self.anchors))]
        for p in self.stitch_parts(s):
            if p[0] == "block":
                mods.append(blocks[p[1]][p[2]])
            elif p[0] == "layer":
                mods.append(self.layer(*p[1:]))
        return mods

    def params(self, stitch: int) -> int:
        """Parameters used by ``stitch`` (front anchor's embedding, blocks, stitching layers, end anchor's norm and head)."""
        s = self.stitches[self._check(stitch)]
        params = [p for m in (shell(self.anchors[s.route[0]], "stem"), shell(self.anchors[s.route[-1]], "tail"), self.heads[s.route[-1]]) for p in m.parameters()]
        for m in self._modules_of(s):  # stitching layers counted merged, as deployed
            params += [m.weight, m.bias] if isinstance(m, StitchingLayer) else list(m.parameters())
        return sum(p.numel() for p in {id(p): p for p in params}.values())

    def table(self) -> list[dict]:
        """One row per stitch: id, kind, description, FLOPs, params."""
        flops = self.flops()
        return [{"id": s.id, "kind": s.kind, "description": s.description, "flops": flops[s.id], "params": self.params(s.id)} for s in self.stitches]

    def describe(self) -> str:
        lines = [f"{'id':>4} {'kind':6} {'MFLOPs':>9} {'params':>10}  description"]
        for r in self.table():
            lines.append(f"{r['id']:>4} {r['kind']:6} {r['flops'] / 1e6:>9.2f} {r['params']:>10}  {r['description']}")
        return "\n".join(lines)

    # -- deployment ---------------------------------------------------------------------
    def extract(self, stitch: int) -> StitchedViT:
        """A standalone copy of ``stitch`` (its blocks, stitching layers merged to ``nn.Linear``, head)."""
        s = self.stitches[self._check(stitch)]
        stages = [m.to_linear() if isinstance(m, StitchingLayer) else m for m in self._modules_of(s)]
        parts = nn.ModuleDict({"stem": shell(self.anchors[s.route[0]], "stem"), "stages": nn.Sequential(*stages),
                               "tail": shell(self.anchors[s.route[-1]], "tail"), "head": self.heads[s.route[-1]]})
        parts = copy.deepcopy(parts)  # one deepcopy: modules used twice stay shared
        return StitchedViT(parts["stem"], parts["stages"], parts["tail"], parts["head"], s.description).train(self.training)
