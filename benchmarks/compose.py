"""What composing a module from parts costs, side by side in one run (CPU).

1. ``composed_kd_prune_vs_kd``: training-step time of a small ViT student distilled from a larger ViT teacher
   (``zoo.Classifier`` with ``losses: [CrossEntropy, SoftTargetKL]``, the setting of configs/compose/kd_prune.yaml)
   with gradual magnitude pruning (``callbacks.pruning.MagnitudePruning``, cubic schedule to 50 %, a pruning step
   every 10 steps inside the measured window) over the same distillation without pruning. Goal <= 1.05.
2. ``parts_vs_monolith``: training-step time of ``zoo.Classifier`` with one ``CrossEntropy`` term over a hand-written
   LightningModule with the same backbone, head, optimizer, metrics and logging and a plain cross-entropy (the
   monolithic step the zoo had before loss terms). Goal <= 1.02.

    OMP_NUM_THREADS=2 python benchmarks/compose.py [--steps 40 --warmup 5 --repeats 5]

Runs alternate (A B, B A, A B, ...) so that machine load hits both and neither always runs first; each run's time is the median of its step times
after the warm-up, and a figure is the ratio of the medians over runs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.pruning import MagnitudePruning  # noqa: E402
from callbacks.pruning_schedules import Cubic  # noqa: E402
from timing import StepTimer  # noqa: E402
from zoo.backbones import build_backbone  # noqa: E402
from zoo.batch import Batch, as_batch, collate  # noqa: E402
from zoo.classifier import Classifier, accuracy_metrics, param_groups  # noqa: E402
from zoo.distillation import SoftTargetKL  # noqa: E402
from zoo.losses import CrossEntropy  # noqa: E402

VIT = "timm/vit_tiny_patch16_224"
STUDENT = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 2.0}
TEACHER = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0}
WIDE = {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 192, "depth": 6, "num_heads": 3}  # benchmarks/overhead.py's ViT


class Images(Dataset):
    """Random images as :class:`~zoo.batch.Batch` samples, the way zoo datamodules yield them."""

    def __init__(self, n: int, shape: tuple[int, ...]):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return Batch(self.x[i], self.y[i])


class Monolith(LightningModule):
    """The hand-written reference: backbone + head, plain cross-entropy, the same metrics, logging and optimizer."""

    def __init__(self, model_kwargs: dict[str, Any]):
        super().__init__()
        self.backbone = build_backbone(VIT, **model_kwargs)
        self.head = nn.Linear(self.backbone.num_features, 10)
        self.train_metrics = accuracy_metrics(10, "train/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch.inputs)
        loss = F.cross_entropy(logits, batch.targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch.targets))
        self.train_metrics.update(logits.detach(), batch.targets)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self, set(self.backbone.no_weight_decay())))


def run(module: LightningModule, data: Dataset, batch: int, steps: int, warmup: int, extra: list | None = None) -> float:
    """Median training-step time (seconds) after ``warmup`` steps; ``extra`` callbacks run inside the timed span."""
    timer = StepTimer()
    trainer = Trainer(max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer, *(extra or [])])
    trainer.fit(module, DataLoader(data, batch_size=batch, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)))
    return statistics.median(timer.times[warmup:])


def kd_student() -> Classifier:
    seed_everything(0, verbose=False)
    teacher = {"model": VIT, "pretrained": False, "untrained_head": True, "model_kwargs": TEACHER}
    return Classifier(VIT, num_classes=10, model_kwargs=STUDENT,
                      losses=[CrossEntropy(weight=0.1), SoftTargetKL(weight=0.9, temperature=4.0, teacher=teacher)])


def kd_prune(args) -> dict[str, float]:
    data = Images(args.batch * (args.steps + args.warmup), (1, 28, 28))
    times: dict[str, list[float]] = {"kd": [], "kd_prune": []}
    pruned = 0.0
    for i in range(args.repeats):
        for side in ("kd", "kd_prune")[:: 1 if i % 2 == 0 else -1]:  # A B, B A, ...: no side always runs first
            prune = MagnitudePruning(Cubic(final_sparsity=0.5, start=args.warmup, end=args.warmup + args.steps - 1, frequency=10), patterns=["backbone.blocks.*"])
            times[side].append(run(kd_student(), data, args.batch, args.steps, args.warmup, [prune] if side == "kd_prune" else []))
            pruned = prune.history[-1][2] if prune.history else pruned
    kd, both = statistics.median(times["kd"]), statistics.median(times["kd_prune"])
    print(f"KD (ViT {STUDENT['embed_dim']}x{STUDENT['depth']} from ViT {TEACHER['embed_dim']}x{TEACHER['depth']}, batch {args.batch}), "
          f"median step over {args.repeats} alternating runs: KD {1e3 * kd:.1f} ms, KD + gradual magnitude pruning {1e3 * both:.1f} ms "
          f"(sparsity reached {pruned:.2f}) -> x{both / kd:.3f} (goal <= 1.05; runs KD {_ms(times['kd'])}, KD + pruning {_ms(times['kd_prune'])})")
    return {"composed_kd_prune_vs_kd": both / kd}


def parts_vs_monolith(args) -> dict[str, float]:
    data = Images(args.batch * (args.steps + args.warmup), (3, 32, 32))
    times: dict[str, list[float]] = {"monolith": [], "parts": []}
    for i in range(args.repeats):
        for side in ("monolith", "parts")[:: 1 if i % 2 == 0 else -1]:
            seed_everything(0, verbose=False)
            module = Monolith(WIDE) if side == "monolith" else Classifier(VIT, num_classes=10, model_kwargs=WIDE, losses=[CrossEntropy()])
            times[side].append(run(module, data, args.batch, args.steps, args.warmup))
    mono, parts = statistics.median(times["monolith"]), statistics.median(times["parts"])
    print(f"ViT {WIDE['embed_dim']}x{WIDE['depth']} batch {args.batch}, median step over {args.repeats} alternating runs: hand-written "
          f"LightningModule {1e3 * mono:.1f} ms, zoo.Classifier(losses=[CrossEntropy]) {1e3 * parts:.1f} ms -> x{parts / mono:.3f} "
          f"(goal <= 1.02; runs monolith {_ms(times['monolith'])}, parts {_ms(times['parts'])})")
    return {"parts_vs_monolith": parts / mono}


def _ms(values: list[float]) -> str:
    return "/".join(f"{1e3 * v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each side")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per Trainer otherwise
    figures = {**kd_prune(args), **parts_vs_monolith(args)}
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
