"""Training throughput of zoo.Classifier under Lightning vs a plain PyTorch loop, for a model whose compute
hides everything else and for a small one where the data path and the loop show (issue 17).

- ViT case: same model (a ViT, width 192, 6 blocks, 64 tokens), same data (in-memory tensors), same batch (64),
  same optimizer; both timed over the same number of steps after a warm-up, alternating runs.
- Small-model case: the 784-256-256-10 MLP (``zoo/mlp``) on Fashion-MNIST, batch 64, SGD: a plain PyTorch loop
  over pre-built (normalised, float) tensors against ``zoo fit`` with ``datamodules.FashionMNIST`` (its loader,
  default logger and callbacks included); training time per step, and the time to evaluate the 10,000 test
  images (``trainer.test`` vs a plain ``no_grad`` loop). Evaluation runs in batches of 1,000 on BOTH sides (the
  datamodule's ``eval_batch_size: 1000``; the plain loop slices the same 1,000): in-memory data evaluates in large
  batches; the zoo side also computes the test loss and top-5 accuracy, the plain loop top-1 only. The two
  evaluations are called alternately, one call each, ``eval_repeats`` times after each training run, and each side
  keeps its fastest call (one evaluation is ~0.06 s; this machine's speed drifts by up to 1.5x over seconds). The
  training runs (plain, floors, zoo) alternate ``repeats`` times and each keeps its fastest run, as ``timeit`` does
  (a median of 3 moved the ratio between 1.2 and 1.8 from one quiet run to the next); the medians are printed too.
- The floor under Lightning: the same MLP as a minimal ``LightningModule`` (cross-entropy, nothing else) trained by a
  bare ``Trainer`` (no logger, no callbacks) over the plain loop's pre-built batches: ``lightning_floor_vs_plain``
  is what Lightning's own per-step loop costs on this model, which no data path or module can remove;
  ``lightning_manual_floor_vs_plain`` the same with manual optimisation (``automatic_optimization = False``: zero_grad,
  ``manual_backward`` and ``step`` in ``training_step``), Lightning's leanest loop. ``small_model_vs_lightning_floor``
  is the zoo over the (automatic) floor: what the zoo's own data path, module and default callbacks add.

Last line: JSON with ``lightning_vs_plain_torch`` (goal <= 1.05), ``small_model_vs_plain_torch`` (goal <= 1.25),
``small_eval_vs_plain_torch`` (goal <= 1.5), ``lightning_floor_vs_plain``, ``lightning_manual_floor_vs_plain`` and
``small_model_vs_lightning_floor``, time ratios. ``--smoke`` runs a few
steps of each, to check that the script works (its figures mean nothing).

    python benchmarks/overhead.py [--smoke] [--data-dir data]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.classifier import Classifier  # noqa: E402
from timing import PeriodTimer, batch_indices, timed  # noqa: E402

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


# -- the small-model case ------------------------------------------------------------------
SMALL = {"batch": 64, "eval_batch": 1000, "eval_repeats": 3, "steps": 300, "warmup": 30, "repeats": 7, "lr": 0.05}
MLP_KWARGS = {"img_size": 28, "in_chans": 1, "hidden": [256, 256]}


def small_model():
    seed_everything(0, verbose=False)
    return Classifier(model="zoo/mlp", num_classes=10, model_kwargs=MLP_KWARGS, optimizer=lambda p: torch.optim.SGD(p, lr=SMALL["lr"]))


def fmnist_tensors(data_dir: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The training and test splits as normalised float tensors, built once (the plain loop's data)."""
    from datamodules import FashionMNIST

    dm = FashionMNIST(data_dir=data_dir, download=False)
    dm.setup()
    out = {}
    for split in ("train", "test"):
        subset = dm.split(split)
        rows = subset.rows()
        out[split] = (dm.eval_transform()(subset.dataset.images[rows]), subset.dataset.targets_tensor[rows])
    return out


def plain_small_train(data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Seconds per step of a plain loop over shuffled pre-built tensors."""
    x, y = data
    model = small_model()
    optimizer = model.configure_optimizers()
    model.train()
    for i, idx in enumerate(batch_indices(len(x), SMALL["batch"], SMALL["warmup"] + SMALL["steps"])):
        if i == SMALL["warmup"]:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / SMALL["steps"]


@torch.no_grad()
def plain_small_eval(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Seconds to evaluate the test tensors in batches of ``eval_batch`` (top-1 hits)."""
    x, y = data
    model.eval()
    b = SMALL["eval_batch"]
    start = time.perf_counter()
    correct = 0
    for i in range(0, len(x), b):
        correct += int((model(x[i:i + b]).argmax(-1) == y[i:i + b]).sum())
    return time.perf_counter() - start


class Floor(LightningModule):
    """The MLP as a minimal LightningModule: cross-entropy on ``(inputs, targets)``, the plain loop's SGD."""

    def __init__(self):
        super().__init__()
        self.net = small_model()

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=SMALL["lr"])


class ManualFloor(Floor):
    """:class:`Floor` with manual optimisation: Lightning's loop without its automatic-optimisation closure."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


class Batches:
    """The plain loop's batches (the same shuffled slices of the pre-built tensors) as an iterable."""

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor]):
        self.x, self.y = data

    def __iter__(self):
        for idx in batch_indices(len(self.x), SMALL["batch"], SMALL["warmup"] + SMALL["steps"]):
            yield self.x[idx], self.y[idx]


def floor_small_train(data: tuple[torch.Tensor, torch.Tensor], module: type[LightningModule] = Floor) -> float:
    """Seconds per step of :class:`Floor` (or ``module``) under a bare Trainer over :class:`Batches`."""
    timer = PeriodTimer(warmup=SMALL["warmup"])
    trainer = Trainer(max_steps=SMALL["warmup"] + SMALL["steps"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module(), train_dataloaders=Batches(data))
    return (timer.end - timer.start) / timer.steps


def zoo_small(data_dir: str, test_data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """``zoo fit`` (built by the zoo's CLI from a config, then fit with a timer attached), then ``trainer.test`` and
    the plain evaluation loop over ``test_data`` called alternately: seconds per training step, and the fastest
    evaluation of the test split of each (zoo, plain)."""
    import yaml

    from cli import main as zoo

    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": SMALL["warmup"] + SMALL["steps"], "accelerator": "cpu", "devices": 1, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False},
        "model": {"class_path": "zoo.Classifier", "init_args": {
            "model": "zoo/mlp", "model_kwargs": MLP_KWARGS,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": SMALL["lr"]}}}},
        "data": {"class_path": "datamodules.FashionMNIST", "init_args": {"data_dir": data_dir, "batch_size": SMALL["batch"],
                                                                          "eval_batch_size": SMALL["eval_batch"], "download": False}},
    }
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the run's logs and checkpoints
        try:
            Path("small.yaml").write_text(yaml.safe_dump(config))
            cli = zoo(["--config", "small.yaml"], run=False)
            timer = PeriodTimer(warmup=SMALL["warmup"])
            cli.trainer.callbacks.append(timer)
            cli.trainer.fit(cli.model, cli.datamodule)
            model = small_model()
            zoo_e, plain_e = [], []
            for _ in range(SMALL["eval_repeats"]):
                zoo_e.append(timed(lambda: cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False), 1))
                plain_e.append(plain_small_eval(model, test_data))
        finally:
            os.chdir(here)
    return (timer.end - timer.start) / timer.steps, min(zoo_e), min(plain_e)


def small_case(data_dir: str) -> dict[str, float]:
    """Median ratios of training step times (zoo, floor, manual floor over plain; zoo over floor) and the zoo/plain
    ratio of the fastest evaluations, alternating runs."""
    data = fmnist_tensors(data_dir)
    plain_t, plain_e, zoo_t, zoo_e, floor_t, manual_t = [], [], [], [], [], []
    for _ in range(SMALL["repeats"]):
        plain_t.append(plain_small_train(data["train"]))
        floor_t.append(floor_small_train(data["train"]))
        manual_t.append(floor_small_train(data["train"], ManualFloor))
        t, e, p = zoo_small(data_dir, data["test"])
        zoo_t.append(t)
        zoo_e.append(e)
        plain_e.append(p)
    med = statistics.median
    print(f"small MLP, batch {SMALL['batch']}, fastest of {SMALL['repeats']} runs: plain {min(plain_t) * 1000:.2f} ms/step, minimal LightningModule "
          f"{min(floor_t) * 1000:.2f} ms/step (manual optimisation {min(manual_t) * 1000:.2f}), zoo fit {min(zoo_t) * 1000:.2f} ms/step (medians: "
          f"{med(plain_t) * 1000:.2f}, {med(floor_t) * 1000:.2f}, {med(manual_t) * 1000:.2f}, {med(zoo_t) * 1000:.2f}: zoo / plain "
          f"{med(zoo_t) / med(plain_t):.3f}); test split (batches of {SMALL['eval_batch']}, fastest): plain {min(plain_e):.4f} s, zoo {min(zoo_e):.4f} s")
    return {"train": min(zoo_t) / min(plain_t), "eval": min(zoo_e) / min(plain_e), "floor": min(floor_t) / min(plain_t),
            "manual_floor": min(manual_t) / min(plain_t), "zoo_over_floor": min(zoo_t) / min(floor_t)}


def main() -> None:
    global STEPS, WARMUP, REPEATS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of each case: checks the script, measures nothing")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent / "data"), help="where FashionMNIST lives")
    args = parser.parse_args()
    if args.smoke:
        STEPS, WARMUP, REPEATS = 3, 1, 1
        SMALL.update(steps=5, warmup=2, repeats=1, eval_repeats=2)
    light, plain = [], []
    for _ in range(REPEATS):
        plain.append(plain_run())
        light.append(lightning_run())
    ratio = statistics.median(light) / statistics.median(plain)
    print(f"plain PyTorch: {statistics.median(plain) / STEPS * 1000:.1f} ms/step   Lightning + zoo.Classifier: {statistics.median(light) / STEPS * 1000:.1f} ms/step")
    print(f"Lightning / plain: {ratio:.3f}x (goal <= 1.05)")
    small = small_case(args.data_dir)
    print(f"small model, zoo / plain: training {small['train']:.3f}x (goal <= 1.25; a minimal LightningModule: {small['floor']:.3f}x, "
          f"with manual optimisation {small['manual_floor']:.3f}x; the zoo over the minimal module {small['zoo_over_floor']:.3f}x), "
          f"evaluation {small['eval']:.3f}x (goal <= 1.5)" + ("   [--smoke: not a measurement]" if args.smoke else ""))
    print(json.dumps({"lightning_vs_plain_torch": round(ratio, 4), "small_model_vs_plain_torch": round(small["train"], 4),
                      "small_eval_vs_plain_torch": round(small["eval"], 4), "lightning_floor_vs_plain": round(small["floor"], 4),
                      "lightning_manual_floor_vs_plain": round(small["manual_floor"], 4),
                      "small_model_vs_lightning_floor": round(small["zoo_over_floor"], 4), "smoke": args.smoke}))


if __name__ == "__main__":
    main()
