"""Training throughput of zoo.Classifier under Lightning vs a plain PyTorch loop.

Same model (a ViT, width 192, 6 blocks, 64 tokens), same data (in-memory tensors), same batch (64),
same optimizer; both timed over the same number of steps after a warm-up, alternating runs.
Last line: JSON with ``lightning_vs_plain_torch`` (time ratio, goal <= 1.05).

    python benchmarks/overhead.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from zoo.classifier import Classifier

MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 192, "depth": 6, "num_heads": 3}
BATCH, STEPS, WARMUP, REPEATS = 64, 30, 5, 3


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(BATCH * (STEPS + WARMUP), 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH * (STEPS + WARMUP),), generator=g))


def make_model() -> Classifier:
    seed_everything(0, verbose=False)
    return Classifier(model="timm/vit_tiny_patch16_224", num_classes=10, model_kwargs=MODEL_KWARGS)


class Data(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(make_data(), batch_size=BATCH, shuffle=True)


class StepTimer(Callback):
    """Wall time of the training steps after the warm-up ones."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def lightning_run() -> float:
    timer = StepTimer()
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(make_model(), Data())
    return timer.seconds


def plain_run() -> float:
    model = make_model()
    optimizer = model.configure_optimizers()
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=True)
    model.train()
    for i, (x, y) in enumerate(loader):
        if i == WARMUP:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    light, plain = [], []
    for _ in range(REPEATS):
        plain.append(plain_run())
        light.append(lightning_run())
    ratio = statistics.median(light) / statistics.median(plain)
    print(f"plain PyTorch: {statistics.median(plain) / STEPS * 1000:.1f} ms/step   Lightning + zoo.Classifier: {statistics.median(light) / STEPS * 1000:.1f} ms/step")
    print(f"Lightning / plain: {ratio:.3f}x (goal <= 1.05)")
    print(json.dumps({"lightning_vs_plain_torch": round(ratio, 4)}))


if __name__ == "__main__":
    main()
