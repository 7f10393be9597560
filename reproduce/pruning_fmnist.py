"""Pruning at small scale on real Fashion-MNIST: does accuracy survive 50 % and 80 % sparsity?

1. Gradual magnitude pruning (Zhu & Gupta 2017, cubic schedule) of a small ViT trained from scratch:
   dense vs 50 % vs 80 % of the transformer-block weights removed during training, every layer pruned to the
   scheduled sparsity (Zhu & Gupta; ``--vit-global``: one threshold over all blocks, the default before issue 16).
2. Structured pruning of EfficientNet-Lite0 (real ImageNet weights) finetuned on Fashion-MNIST at
   32x32: dense finetuning vs 50 % of the channels of every group masked over the first two epochs and
   physically removed at the end; test accuracy and measured CPU latency.

Affordable on 2 CPU cores (a subset of the training set, few epochs; the EfficientNet half takes 4 minutes on a
quiet 2-core machine, the ViT half about 25 on a heavily loaded one):

    OMP_NUM_THREADS=2 python reproduce/pruning_fmnist.py [--parts vit effnet] [--samples-per-class 300 --vit-epochs 6] [--vit-global]
        [--vit-sparsities 0 0.5 0.8]
        [--effnet-samples-per-class 300 --effnet-epochs 6 --effnet-test-batches 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from lightning.pytorch import Trainer, seed_everything

from callbacks.pruning import MagnitudePruning, StructuredPruning
from callbacks.pruning_schedules import Cubic, Linear
from datamodules import FashionMNIST
from zoo import Classifier

VIT_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


def run(module: Classifier, data: FashionMNIST, epochs: int, callbacks: list, test_batches: int | None = None) -> float:
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0, limit_test_batches=test_batches)
    trainer.fit(module, data)
    return trainer.test(module, data, verbose=False)[0]["test/acc"]


@torch.inference_mode()
def cpu_latency_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int = 15) -> float:
    module.eval()
    module(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def nonzero(module: torch.nn.Module, prefix: str = "", min_ndim: int = 0) -> tuple[int, int]:
    params = [p for n, p in module.named_parameters() if n.startswith(prefix) and p.ndim >= min_ndim]
    return sum(int((p != 0).sum()) for p in params), sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--samples-per-class", type=int, default=300)
    parser.add_argument("--vit-epochs", type=int, default=6)
    parser.add_argument("--effnet-epochs", type=int, default=6)
    parser.add_argument("--effnet-samples-per-class", type=int, default=300)
    parser.add_argument("--effnet-test-batches", type=int, default=0, help="test on the first N batches only (0: all 10k)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--vit-sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8], help="ViT rows to run (0: dense)")
    parser.add_argument("--vit-global", action="store_true", help="global magnitude threshold over all blocks (default: per layer)")
    parser.add_argument("--parts", nargs="+", default=["vit", "effnet"], choices=["vit", "effnet"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []

    # 1. small ViT, gradual magnitude pruning during training
    vit_data = FashionMNIST(data_dir=args.data_dir, batch_size=args.batch_size, samples_per_class=args.samples_per_class, val_fraction=0.0)
    vit_data.setup("fit")
    steps = args.vit_epochs * len(vit_data.train_dataloader())
    for sparsity in args.vit_sparsities if "vit" in args.parts else ():
        seed_everything(0, verbose=False)
        module = Classifier("timm/vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT_KWARGS,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.05))
        callbacks = []
        if sparsity:  # prune from 10 % to 70 % of training, every 10 steps, then train on at the final sparsity
            callbacks.append(MagnitudePruning(Cubic(final_sparsity=sparsity, start=steps // 10, end=7 * steps // 10, frequency=10), patterns=["backbone.blocks.*"],
                                              global_pruning=args.vit_global))
        t0 = time.time()
        acc = run(module, vit_data, args.vit_epochs, callbacks)
        nz, total = nonzero(module, "backbone.blocks.", min_ndim=2)
        rows.append(("ViT (4x64, patch 7)", "dense" if not sparsity else f"gradual magnitude {sparsity:.0%} ({'global' if args.vit_global else 'per layer'})", f"{1 - nz / total:.1%} of block weights",
                     f"{nonzero(module)[0] / 1e3:.0f} K", f"{acc:.4f}", "-", f"{time.time() - t0:.0f}"))
        print(rows[-1], flush=True)

    # 2. EfficientNet-Lite0 (real weights), structured pruning of 50 % of the channels
    eff_data = FashionMNIST(data_dir=args.data_dir, batch_size=args.batch_size, samples_per_class=args.effnet_samples_per_class, val_fraction=0.0, image_size=32)
    x = torch.randn(256, 1, 32, 32)
    for sparsity in (0.0, 0.5) if "effnet" in args.parts else ():
        seed_everything(0, verbose=False)
        module = Classifier("pypi/efficientnet_lite0", num_classes=10, pretrained=True, model_kwargs={"in_chans": 1},
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
        callbacks = []
        if sparsity:  # 25 % of the channels masked at epoch 0, 50 % at epoch 1, then finetune; shrink at the end
            callbacks.append(StructuredPruning(Linear(initial_sparsity=sparsity / 2, final_sparsity=sparsity, start=0, end=1, frequency=1, interval="epoch"), ignore=["head"]))
        t0 = time.time()
        acc = run(module, eff_data, args.effnet_epochs, callbacks, args.effnet_test_batches or None)
        params = sum(p.numel() for p in module.parameters())
        rows.append(("EfficientNet-Lite0 32px", "dense finetune" if not sparsity else f"structured {sparsity:.0%} channels", "-",
                     f"{params / 1e6:.2f} M", f"{acc:.4f}", f"{cpu_latency_ms(module, x):.1f}", f"{time.time() - t0:.0f}"))
        print(rows[-1], flush=True)

    header = ("model", "method", "weight sparsity", "params (nonzero)", "test acc", "CPU ms / 256 imgs", "train s")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    eff_test = "all 10k" if not args.effnet_test_batches else f"first {args.effnet_test_batches * args.batch_size}"
    print(f"\nFashion-MNIST: ViT {args.samples_per_class}/class training images, {args.vit_epochs} epochs, all 10k test images; "
          f"EfficientNet {args.effnet_samples_per_class}/class, {args.effnet_epochs} epochs, {eff_test} test images")
    for i, r in enumerate((header, *rows)):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
