"""Replay cost: buffer insertion + sampling vs an ER training step, ER vs a plain step, and the reproduction stream.

Same MLP (784-256-256-10) as the reproduction, batch 32, replay batch 32, SGD, 28x28 uint8 inputs; the buffer
holds 5,000 samples and is full (steady state). Steps run in a plain loop over ``training_loss`` so only the
method's own cost is timed; ER and plain steps alternate over repeats and the median is kept. Insertion and
sampling are also timed with 500 and 50,000 samples to show they do not grow with the buffer.
Last line: JSON with ``buffer_time_fraction`` (goal <= 0.05), ``er_step_vs_plain`` and ``stream_minutes``
(the ER run of ``reproduce/continual_split_fmnist.py`` on real Fashion-MNIST).

    OMP_NUM_THREADS=2 python benchmarks/continual.py [--no-stream]
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
from lightning.pytorch import seed_everything

from datamodules import FashionMNIST
from zoo.batch import Batch
from zoo.continual import ER, FineTune
from zoo.continual.buffer import ReplayBuffer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-stream", action="store_true", help="skip the reproduction stream (stream_minutes: null)")
    args = parser.parse_args()
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
    stream_minutes = None
    if not args.no_stream:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from reproduce.continual_split_fmnist import run_method

        result = run_method("er")
        stream_minutes = round(result["seconds"] / 60, 3)
        print(f"ER on the reproduction stream (Split Fashion-MNIST, 5 tasks): {stream_minutes:.2f} min, final average accuracy {result['avg_acc']:.4f}")
    print(json.dumps({"buffer_time_fraction": round(buffer_ops / er_step, 4), "er_step_vs_plain": round(er_step / plain_step, 3), "stream_minutes": stream_minutes}))


if __name__ == "__main__":
    main()
