"""Benchmark of the pruning callbacks, side by side in one run (CPU).

1. ``callback_overhead``: training-step time of a small ViT (Fashion-MNIST sized, 28x28, batch 64, width 64,
   depth 4) with the gradual magnitude-pruning callback (cubic schedule to 80 %, pruning every 20 steps
   inside the measured window) over the same training without it. Goal <= 1.03.
2. ``structured_50pct_latency_ratio``: inference latency of EfficientNet-Lite0 (real weights) after
   :class:`StructuredPruning` physically removed 50 % of the channels of every group, over the dense
   model. Goal <= 0.6.

    OMP_NUM_THREADS=1 python benchmarks/pruning.py [--steps 60 --repeats 5]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from callbacks.pruning import MagnitudePruning, StructuredPruning
from callbacks.pruning_schedules import Cubic, OneShot
from timing import StepTimer
from zoo import Classifier

VIT_KWARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


def step_time(prune: bool, steps: int, warmup: int = 10) -> float:
    seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.randn(64 * 8, 1, 28, 28), torch.randint(0, 10, (64 * 8,))), batch_size=64, shuffle=True)
    timer = StepTimer()
    callbacks = [timer]
    if prune:  # pruning every 20 steps over the whole measured window
        callbacks.append(MagnitudePruning(Cubic(final_sparsity=0.8, start=warmup, end=warmup + steps - 1, frequency=20), patterns=["backbone.blocks.*"]))
    trainer = Trainer(max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", callbacks=callbacks)
    trainer.fit(Classifier("timm/vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT_KWARGS), data)
    return sum(timer.times[warmup:]) / len(timer.times[warmup:])


@torch.inference_mode()
def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    # 1. gradual magnitude pruning: step time with / without the callback, alternating runs
    dense, pruned = [], []
    for _ in range(args.repeats):
        dense.append(step_time(False, args.steps))
        pruned.append(step_time(True, args.steps))
    # min over repeats: other processes only ever add time (the timeit convention)
    overhead = min(pruned) / min(dense)
    print(f"\nViT mean step time over {args.steps} steps (min of {args.repeats} alternating runs): dense {1e3 * min(dense):.1f} ms, "
          f"with MagnitudePruning {1e3 * min(pruned):.1f} ms -> overhead x{overhead:.3f} (goal <= 1.03; "
          f"medians {1e3 * statistics.median(dense):.1f} / {1e3 * statistics.median(pruned):.1f} ms)")

    # 2. structured pruning of EfficientNet-Lite0: dense vs 50 % of the channels removed
    model = Classifier("pypi/efficientnet_lite0", num_classes=10, pretrained=True).eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    small = Classifier("pypi/efficientnet_lite0", num_classes=10, pretrained=True).eval()
    small.load_state_dict(model.state_dict())
    StructuredPruning(OneShot(0.5), ignore=["head"]).shrink(small, 0.5, x[:1])  # what the callback does at the end of fit
    params = [sum(p.numel() for p in m.parameters()) for m in (model, small)]
    flops = []
    for m in (model, small):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            m(x[:1])
        flops.append(counter.get_total_flops())
    latency(model, x, 3)  # warm-up
    latency(small, x, 3)
    t_dense, t_small = [], []
    for _ in range(args.repeats * 4):  # interleaved, so both see the same machine load
        t_dense += latency(model, x, 1)
        t_small += latency(small, x, 1)
    ratio = min(t_small) / min(t_dense)
    print(f"EfficientNet-Lite0 {args.image_size}px batch {args.batch} (min of {len(t_dense)}): dense {1e3 * min(t_dense):.1f} ms "
          f"({params[0] / 1e6:.2f} M params, {flops[0] / 1e9:.3f} GFLOP/img), 50% channels removed {1e3 * min(t_small):.1f} ms "
          f"({params[1] / 1e6:.2f} M params, {flops[1] / 1e9:.3f} GFLOP/img) -> latency x{ratio:.3f} (goal <= 0.6; ratio of medians {statistics.median(t_small) / statistics.median(t_dense):.3f})")
    print(json.dumps({"callback_overhead": round(overhead, 4), "structured_50pct_latency_ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
