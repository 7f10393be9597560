"""Reproduce SN-Net's claim at small scale: stitches fill the accuracy/MACs range between the anchors (MACs: the papers' FLOPs).

Pan et al. (CVPR 2023), Fig. 1/4: stitching a pretrained family (DeiT-Ti/S/B) and training a few epochs gives
many networks whose accuracy and FLOPs interpolate between the anchors, with a close-to-monotone Pareto front.
Here, on real Fashion-MNIST with no pretrained ViTs available, we:

1. train three ViT anchors of widths 32/64/128 (6 blocks, 28x28 images, patch 7) from scratch;
2. stitch them from their zoo checkpoints (35 stitches), least-squares init, train with one sampled stitch per step;
3. sweep every stitch on the test set, print the table, save the figure and CSV.

    OMP_NUM_THREADS=1 python reproduce/snnet_pareto.py            # ~10 min on an idle CPU core
    python reproduce/snnet_pareto.py --per-class 300 --test 1000  # a quick smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.stitch_sweep import plot_sweep, sweep, write_csv  # noqa: E402
from datamodules import FashionMNIST  # noqa: E402
from zoo.classifier import Classifier  # noqa: E402
from zoo.snnet import SNNetModule  # noqa: E402

WIDTHS, HEADS = (32, 64, 128), (2, 2, 4)
VIT = {"img_size": 28, "patch_size": 7, "in_chans": 1, "depth": 6, "mlp_ratio": 2.0}


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(v).argsort().argsort().double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=2000, help="training images per class")
    parser.add_argument("--anchor-epochs", type=int, default=3)
    parser.add_argument("--stitch-epochs", type=int, default=3)
    parser.add_argument("--test", type=int, default=3000, help="test images for the sweep")
    parser.add_argument("--out", default="runs/snnet_pareto", help="anchor checkpoints found here are reused")
    parser.add_argument("--retrain", action="store_true", help="train the anchors even if their checkpoints exist")
    parser.add_argument("--init", choices=["official", "ours"], default="official",
                        help="least-squares init: 100 fresh augmented images in train mode (official) or the first batch in eval mode")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    dm = FashionMNIST(data_dir="data", batch_size=128, samples_per_class=args.per_class, val_fraction=0.1)
    start = time.time()

    anchors = []
    for width, heads in zip(WIDTHS, HEADS):
        path = out / f"anchor_w{width}.ckpt"
        anchors.append(str(path))
        if path.exists() and not args.retrain:
            print(f"anchor w{width}: reusing {path}", flush=True)
            continue
        t = time.time()
        model = Classifier(model="timm/vit_tiny_patch16_224", model_kwargs={**VIT, "embed_dim": width, "num_heads": heads},
                           optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.05))
        tr = trainer(args.anchor_epochs)
        tr.fit(model, dm)
        tr.save_checkpoint(path)
        print(f"anchor w{width}: trained in {time.time() - t:.0f} s -> {path}", flush=True)

    t = time.time()
    init = {} if args.init == "official" else {"init_batch_size": None, "init_mode": "eval"}
    snnet = SNNetModule(anchors, optimizer=partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.05), **init)
    trainer(args.stitch_epochs).fit(snnet, dm)
    print(f"SN-Net ({len(snnet.net)} stitches): trained in {time.time() - t:.0f} s", flush=True)

    t = time.time()
    dm.setup("test")
    test = torch.utils.data.Subset(dm.test_set, range(min(args.test, len(dm.test_set))))
    rows = sweep(snnet.net, torch.utils.data.DataLoader(test, batch_size=250, collate_fn=dm.collate_fn))
    print(f"sweep of {len(rows)} stitches on {len(test)} test images: {time.time() - t:.0f} s\n")

    print(f"{'id':>3} {'kind':6} {'MMACs':>7} {'params':>8} {'acc %':>6} pareto  description")  # multiply-adds: the papers' FLOPs
    for r in sorted(rows, key=lambda r: r["macs"]):
        print(f"{r['id']:>3} {r['kind']:6} {r['macs'] / 1e6:>7.2f} {r['params']:>8} {100 * r['acc']:>6.2f} {'  *' if r['pareto'] else '   ':6}  {r['description']}")
    anchor_rows = [r for r in rows if r["kind"] == "anchor"]
    lo, hi = min(r["macs"] for r in anchor_rows), max(r["macs"] for r in anchor_rows)
    inside = sum(lo <= r["macs"] <= hi for r in rows) / len(rows)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["macs"])
    print("\nanchors: " + ", ".join(f"{r['description'].split('[')[0]} {100 * r['acc']:.2f}% @ {r['macs'] / 1e6:.2f} MMACs" for r in anchor_rows))
    print(f"stitches with MACs between the smallest and largest anchor: {100 * inside:.0f}%")
    print(f"stitch accuracy range: {100 * min(r['acc'] for r in rows):.2f}% .. {100 * max(r['acc'] for r in rows):.2f}%")
    print(f"Spearman(MACs, accuracy) over all stitches: {spearman([r['macs'] for r in rows], [r['acc'] for r in rows]):.3f}")
    print(f"Pareto front: {len(front)} stitches from {front[0]['macs'] / 1e6:.2f} to {front[-1]['macs'] / 1e6:.2f} MMACs")
    write_csv(rows, out / "stitch_sweep.csv")
    fig = plot_sweep(rows, title="SN-Net on Fashion-MNIST: ViT w32/w64/w128 anchors")
    fig.savefig(out / "snnet_pareto.png", dpi=120)
    print(f"figure: {out / 'snnet_pareto.png'}  table: {out / 'stitch_sweep.csv'}  total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
