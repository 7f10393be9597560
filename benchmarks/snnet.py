"""SN-Net benchmark: a 3-anchor ViT family (widths 48/96/192, 12 blocks each, 32x32 images).

Side by side in one run:
  * switching stitch: ``select`` (ours) vs building the stitch as a standalone module (``extract``);
  * evaluating every stitch: shared-prefix ``forward_all`` (ours, what StitchSweep runs) vs each stitch from
    scratch, for SN-Net's 71 stitches and SN-Netv2's 267 (two-way, v2 space); ``sweep_speedup`` is SN-Netv2's. With
    one-way stitching only the cheap front prefixes are shared, which bounds the saving at ~1.24x in FLOPs;
  * a training step of SN-Net (one uniformly sampled stitch) vs a training step of the largest anchor alone;
  * ``extract(stitch)`` outputs vs the stitched network's, over all stitches.

    OMP_NUM_THREADS=1 python benchmarks/snnet.py [--images 32] [--steps 16]

Ends with one JSON line: switch_ms, sweep_speedup, train_step_vs_largest_anchor, extract_max_abs_diff.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.stitch_sweep import stitch_accuracy  # noqa: E402
from timing import timed  # noqa: E402
from zoo.backbones import build_backbone  # noqa: E402
from zoo.snnet import StitchableNet, StitchSampler  # noqa: E402

WIDTHS, HEADS, DEPTH = (48, 96, 192), (3, 3, 6), 12


def family(two_way: bool = False) -> StitchableNet:
    anchors = [build_backbone("timm/vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=3, embed_dim=w, depth=DEPTH, num_heads=h)
               for w, h in zip(WIDTHS, HEADS)]
    return StitchableNet(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors], two_way=two_way)


def prefix_tree_flops(net: StitchableNet) -> int:
    """FLOPs per image of all stitches when every shared prefix is computed once (the sweep's lower bound)."""
    part, unique = net.part_flops(), set()
    for s in net.stitches:
        prefix = 0
        for p in net.stitch_parts(s):
            prefix = hash((prefix, p))  # a part is shared when the whole path up to it is
            unique.add((prefix, p))
    return sum(part[p] for _, p in unique)


def train_step_time(model_fn, params, x, y, steps: int) -> float:
    """Mean seconds of forward + backward + AdamW step (after 2 warm-up steps)."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = F.cross_entropy(model_fn(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="validation images for the sweep")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--steps", type=int, default=16, help="timed training steps per side")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = family()
    x_init = torch.randn(32, 3, 32, 32)
    net.init_stitching_layers(x_init)
    n = len(net)
    print(f"{n} stitches over anchors {net.names}")

    # 1. switching stitch
    net.eval()
    switch = timed(lambda: [net.select(s) for s in range(n)], 20) / n
    rebuild = timed(lambda: net.extract(n // 2), 5)
    print(f"switch: select {switch * 1e3:.4f} ms | build standalone stitch {rebuild * 1e3:.2f} ms | x{rebuild / switch:.0f}")

    # 2. evaluating every stitch (SN-Net's 71, and SN-Netv2's 267 with two-way stitching in the v2 space)
    images, labels = torch.randn(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    batches = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, args.images, 16)]
    speedups = {}
    for name, sweep_net in (("SN-Net", net), ("SN-Netv2", family(two_way=True))):
        sweep_net.init_stitching_layers(x_init)
        sweep_net.eval()
        t_naive = t_ours = 0.0
        for batch in batches:  # alternate the two sides batch by batch so machine load hits both alike
            t = time.perf_counter()
            with torch.no_grad():
                naive = [int((sweep_net(batch[0], s).argmax(-1) == batch[1]).sum()) for s in range(len(sweep_net))]
            t_naive += time.perf_counter() - t
            t = time.perf_counter()
            ours = stitch_accuracy(sweep_net, [batch])
            t_ours += time.perf_counter() - t
            assert [c / len(batch[1]) for c in naive] == ours, "shared-prefix sweep disagrees with per-stitch evaluation"
        flops, tree = sum(sweep_net.flops()), prefix_tree_flops(sweep_net)
        speedups[name] = t_naive / t_ours
        print(f"sweep {name} ({len(sweep_net)} stitches, {args.images} images): from scratch {t_naive:.2f} s | shared prefixes {t_ours:.2f} s "
              f"| x{t_naive / t_ours:.2f} (FLOPs bound x{flops / tree:.2f})")

    # 3. training step: SN-Net (one sampled stitch) vs the largest anchor
    net.train()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    sampler = StitchSampler([0] * n, seed=0)
    t_snnet = train_step_time(lambda inp: net(inp, sampler.sample()), list(net.parameters()), x, y, args.steps)
    flops = net.flops()
    largest = torch.nn.Sequential(family().anchors[-1], torch.nn.Linear(WIDTHS[-1], 10))
    t_anchor = train_step_time(largest, list(largest.parameters()), x, y, args.steps)
    print(f"train step (batch {args.batch}): SN-Net {t_snnet * 1e3:.1f} ms | largest anchor {t_anchor * 1e3:.1f} ms | ratio {t_snnet / t_anchor:.2f}"
          f" (mean stitch FLOPs / largest anchor: {statistics.mean(flops) / flops[net.anchor_ids[-1]]:.2f})")

    # 4. extract equality
    net.eval()
    xe = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        diff = max((net.extract(s)(xe) - net(xe, s)).abs().max().item() for s in range(n))
    print(f"extract: max |standalone - stitched| over {n} stitches = {diff:.2e}")

    print(json.dumps({"switch_ms": round(switch * 1e3, 6), "sweep_speedup": round(speedups["SN-Netv2"], 3),
                      "train_step_vs_largest_anchor": round(t_snnet / t_anchor, 3), "extract_max_abs_diff": diff}))


if __name__ == "__main__":
    main()
