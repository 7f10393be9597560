"""Replay cost: buffer insertion + sampling vs an ER training step, ER vs a plain step, and the reproduction stream.

Same MLP (784-256-256-10) as the reproduction, batch 32, replay batch 32, SGD, 28x28 uint8 inputs; the buffer
holds 5,000 samples and is full (steady state). Steps run in a plain loop over ``training_loss`` so only the
method's own cost is timed; ER and plain steps alternate over repeats and the median is kept. Insertion and
sampling are also timed with 500 and 50,000 samples to show they do not grow with the buffer.
``stream_step_vs_plain_er`` (issue 17, goal <= 1.3): an ER training step of the reproduction's run (``zoo.continual.ER``
under a Trainer on the Split Fashion-MNIST stream, its loader included; buffer 500, batch 32 + replay 32) over the same
ER step written as a plain loop (pre-built tensors of the first task, the same :class:`ReplayBuffer`, current and
replayed samples in one forward); both timed over the same steps of the first task after a warm-up, alternating, each
side's fastest of 7 runs.
``stream_floor_vs_plain_er``: that plain ER step as a minimal ``LightningModule`` under a bare ``Trainer`` over the
plain loop's batches, what Lightning's own per-step loop costs on this step (no data path or module removes it);
``stream_step_vs_lightning_floor``: the zoo's step over that floor (what the zoo's stream loader and module add).
Last line: JSON with ``buffer_time_fraction`` (goal <= 0.05), ``er_step_vs_plain``, ``stream_step_vs_plain_er``,
``stream_floor_vs_plain_er``, ``stream_step_vs_lightning_floor`` and ``stream_minutes`` (the ER run of ``reproduce/continual_split_fmnist.py`` on real
Fashion-MNIST).

    OMP_NUM_THREADS=1 python benchmarks/continual.py [--no-stream] [--data-dir data]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import FashionMNIST  # noqa: E402
from datamodules.continual import ContinualDataModule  # noqa: E402
from zoo.batch import Batch  # noqa: E402
from zoo.continual import ER, FineTune  # noqa: E402
from zoo.continual.buffer import ReplayBuffer  # noqa: E402
from timing import PeriodTimer, batch_indices  # noqa: E402

MLP = {"model": "zoo/mlp", "model_kwargs": {"img_size": 28, "hidden": [256, 256]}}
BATCH, BUFFER, STEPS, WARMUP, REPEATS = 32, 5000, 150, 20, 5


def batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    transform = FashionMNIST(download=False).eval_transform()
    out = []
    for _ in range(n):
        raw = torch.randint(0, 256, (BATCH, 1, 28, 28), dtype=torch.uint8, generator=g)
        out.append(Batch(transform(raw), torch.randint(0, 10, (BATCH,), generator=g), task=torch.zeros(BATCH, dtype=torch.long), raw=raw))
    return out


def make(cls, **kwargs):
    seed_everything(0, verbose=False)
    module = cls(**MLP, **kwargs)
    module.stream = SimpleNamespace(scenario="class", buffer_transform=FashionMNIST(download=False).eval_transform())
    return module


def fill(buffer: ReplayBuffer, data) -> None:
    while buffer.seen < buffer.capacity:
        b = data[buffer.seen // BATCH % len(data)]
        buffer.add(b.raw, b.targets, b.task, torch.zeros(BATCH, 10))


def time_steps(module, data) -> float:
    """Seconds per training step (forward, replay, insertion, backward, SGD update)."""
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    for i, batch in enumerate(data[:WARMUP] + data):
        if i == WARMUP:
            start = time.perf_counter()
        loss, _, _ = module.training_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(data)


def time_buffer_ops(buffer: ReplayBuffer, data) -> float:
    """Seconds per step spent in the buffer: one insertion of the batch and one replay draw."""
    logits = torch.zeros(BATCH, 10)
    start = time.perf_counter()
    for b in data:
        buffer.add(b.raw, b.targets, b.task, logits)
        buffer.sample(BATCH)
    return (time.perf_counter() - start) / len(data)


STREAM = {"buffer": 500, "batch": 32, "lr": 0.05, "warmup": 30, "steps": 300, "repeats": 7}


def stream(data_dir: str) -> ContinualDataModule:
    return ContinualDataModule(FashionMNIST(data_dir=data_dir, batch_size=STREAM["batch"], val_fraction=0.05, download=False, seed=0),
                               classes_per_task=2)


def zoo_er_step(data_dir: str) -> float:
    """Seconds per ER step of the reproduction's run (first task), Trainer and loader included."""
    seed_everything(0, verbose=False)
    module = ER(**MLP, buffer_size=STREAM["buffer"], replay_batch_size=STREAM["batch"], optimizer=lambda p: torch.optim.SGD(p, lr=STREAM["lr"]))
    timer = PeriodTimer(warmup=STREAM["warmup"])
    trainer = Trainer(max_epochs=5, max_steps=STREAM["warmup"] + STREAM["steps"], reload_dataloaders_every_n_epochs=1, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, stream(data_dir))
    return (timer.end - timer.start) / timer.steps


def first_task(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first task's training samples (classes 0 and 1: the stream's default class order) as pre-built tensors:
    raw uint8 images, normalised floats, targets."""
    base = FashionMNIST(data_dir=data_dir, download=False, val_fraction=0.05, seed=0)
    base.setup()
    subset = base.split("train")
    rows = subset.rows()
    raw, y = subset.dataset.images[rows], subset.dataset.targets_tensor[rows]
    keep = y < 2
    return raw[keep], base.eval_transform()(raw[keep]), y[keep]


def plain_er_step(data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """Seconds per step of ER written as a plain loop: draw from the buffer, one forward over current + replayed
    samples, cross-entropy, SGD update, reservoir insertion of the batch (the same ReplayBuffer)."""
    raw, x, y = data
    seed_everything(0, verbose=False)
    model = FineTune(**MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=STREAM["lr"])
    transform = FashionMNIST(download=False).eval_transform()
    buffer, b = ReplayBuffer(STREAM["buffer"]), STREAM["batch"]
    task = torch.zeros(b, dtype=torch.long)
    model.train()
    for i, idx in enumerate(batch_indices(len(x), b, STREAM["warmup"] + STREAM["steps"])):
        if i == STREAM["warmup"]:
            start = time.perf_counter()
        inputs, targets = x[idx], y[idx]
        if len(buffer):
            bx, by, _, _ = buffer.sample(b)
            inputs, targets = torch.cat([inputs, transform(bx)]), torch.cat([targets, by])
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        buffer.add(raw[idx], y[idx], task, logits[:b].detach())
    return (time.perf_counter() - start) / STREAM["steps"]


class FloorER(LightningModule):
    """:func:`plain_er_step`'s step as a minimal LightningModule (the same model, buffer, forward, loss and insertion)."""

    def __init__(self):
        super().__init__()
        seed_everything(0, verbose=False)
        self.model = FineTune(**MLP)
        self.transform = FashionMNIST(download=False).eval_transform()
        self.buffer, self.task = ReplayBuffer(STREAM["buffer"]), torch.zeros(STREAM["batch"], dtype=torch.long)

    def training_step(self, batch, batch_idx):
        raw, x, y = batch
        inputs, targets = x, y
        if len(self.buffer):
            bx, by, _, _ = self.buffer.sample(STREAM["batch"])
            inputs, targets = torch.cat([inputs, self.transform(bx)]), torch.cat([targets, by])
        logits = self.model(inputs)
        self.buffer.add(raw, y, self.task, logits[:len(y)].detach())
        return torch.nn.functional.cross_entropy(logits, targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=STREAM["lr"])


class FirstTask:
    """:func:`plain_er_step`'s batches ``(raw, inputs, targets)`` as an iterable."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        raw, x, y = self.data
        for idx in batch_indices(len(x), STREAM["batch"], STREAM["warmup"] + STREAM["steps"]):
            yield raw[idx], x[idx], y[idx]


def floor_er_step(data) -> float:
    """Seconds per step of :class:`FloorER` under a bare Trainer."""
    timer = PeriodTimer(warmup=STREAM["warmup"])
    trainer = Trainer(max_steps=STREAM["warmup"] + STREAM["steps"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(FloorER(), train_dataloaders=FirstTask(data))
    return (timer.end - timer.start) / timer.steps


def stream_step_ratio(data_dir: str) -> tuple[float, float, float]:
    """Zoo / plain, floor / plain and zoo / floor ER step times, each side's fastest of ``repeats`` alternating runs (as
    ``timeit``: this machine's speed drifts by up to 1.5x; the medians are printed too)."""
    data = first_task(data_dir)
    zoo, plain, floor = [], [], []
    for _ in range(STREAM["repeats"]):
        plain.append(plain_er_step(data))
        floor.append(floor_er_step(data))
        zoo.append(zoo_er_step(data_dir))
    zoo_t, plain_t, floor_t = min(zoo), min(plain), min(floor)
    print(f"ER step medians over {STREAM['repeats']} runs: plain {1e3 * statistics.median(plain):.3f} ms, floor {1e3 * statistics.median(floor):.3f} ms, "
          f"zoo {1e3 * statistics.median(zoo):.3f} ms = {statistics.median(zoo) / statistics.median(plain):.2f}x")
    print(f"ER step on the stream (batch {STREAM['batch']} + replay {STREAM['batch']}, buffer {STREAM['buffer']}): plain loop "
          f"{1e3 * plain_t:.3f} ms, minimal LightningModule {1e3 * floor_t:.3f} ms = {floor_t / plain_t:.2f}x, "
          f"zoo (Trainer + stream loader) {1e3 * zoo_t:.3f} ms = {zoo_t / plain_t:.2f}x (goal <= 1.3)")
    return zoo_t / plain_t, floor_t / plain_t, zoo_t / floor_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-stream", action="store_true", help="skip the reproduction stream (stream_minutes: null)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data"), help="where FashionMNIST lives")
    parser.add_argument("--only-stream-step", action="store_true", help="only stream_step_vs_plain_er (the other figures: null)")
    args = parser.parse_args()
    if args.only_stream_step:
        warnings.filterwarnings("ignore")
        stream_step, stream_floor, over_floor = stream_step_ratio(args.data_dir)
        print(json.dumps({"buffer_time_fraction": None, "er_step_vs_plain": None, "stream_step_vs_plain_er": round(stream_step, 3),
                          "stream_floor_vs_plain_er": round(stream_floor, 3), "stream_step_vs_lightning_floor": round(over_floor, 3),
                          "stream_minutes": None}))
        return
    warnings.filterwarnings("ignore", message=".*self.log.*")  # steps run without a Trainer: nothing to log to
    data = batches(STEPS)
    er, plain = make(ER, buffer_size=BUFFER, replay_batch_size=BATCH), make(FineTune)
    fill(er.buffer, data)
    er_times, plain_times, buffer_times = [], [], []
    for _ in range(REPEATS):
        er_times.append(time_steps(er, data))
        plain_times.append(time_steps(plain, data))
        buffer_times.append(time_buffer_ops(er.buffer, data))
    er_step, plain_step, buffer_ops = (statistics.median(v) for v in (er_times, plain_times, buffer_times))
    by_size = {}
    for size in (500, 5000, 50_000):
        buffer = ReplayBuffer(size)
        fill(buffer, data)
        by_size[size] = statistics.median(time_buffer_ops(buffer, data) for _ in range(3))
    print(f"plain step {1e3 * plain_step:.3f} ms | ER step {1e3 * er_step:.3f} ms ({er_step / plain_step:.2f}x) | "
          f"buffer insert+sample {1e3 * buffer_ops:.3f} ms = {buffer_ops / er_step:.3f} of an ER step")
    print("buffer insert+sample by buffer size: " + ", ".join(f"{s:,}: {1e3 * t:.3f} ms ({t / by_size[500]:.2f}x)" for s, t in by_size.items()))
    stream_step, stream_floor, over_floor = stream_step_ratio(args.data_dir)
    stream_minutes = None
    if not args.no_stream:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from reproduce.continual_split_fmnist import run_method

        result = run_method("er")
        stream_minutes = round(result["seconds"] / 60, 3)
        print(f"ER on the reproduction stream (Split Fashion-MNIST, 5 tasks): {stream_minutes:.2f} min, final average accuracy {result['avg_acc']:.4f}")
    print(json.dumps({"buffer_time_fraction": round(buffer_ops / er_step, 4), "er_step_vs_plain": round(er_step / plain_step, 3),
                      "stream_step_vs_plain_er": round(stream_step, 3), "stream_floor_vs_plain_er": round(stream_floor, 3),
                      "stream_step_vs_lightning_floor": round(over_floor, 3), "stream_minutes": stream_minutes}))


if __name__ == "__main__":
    main()
