"""StitchSweep: evaluate every stitch of an SN-Net, chart accuracy against MACs, pick one under a budget.

Evaluates all stitches of a :class:`~zoo.snnet.StitchableNet` (``pl_module.net`` of an
:class:`~zoo.snnet.SNNetModule`) on the validation set when fitting ends, with :meth:`~zoo.snnet.StitchableNet.forward_all`: each shared prefix is computed
once, so the sweep costs far less than running every stitch from scratch. It writes a CSV (id, kind,
description, MACs, FLOPs, params, latency, accuracy, Pareto), logs a TensorBoard figure of accuracy vs MACs
(Pareto front marked, anchors highlighted) and selects the most accurate stitch within the budget
(``pl_module.select_stitch``)::

    trainer:
      callbacks:
        - class_path: callbacks.stitch_sweep.StitchSweep
          init_args: {max_macs: 1.0e8, max_latency_ms: null, csv_path: null}

Units: ``macs`` are multiply-adds, what the SN-Net papers and their fvcore budgets call "FLOPs" (DeiT-S: 4.6 G);
``flops`` count 2 per multiply-add (``torch.utils.flop_counter``), twice as many.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.tensor import eval_batches
from zoo import sharding
from zoo.batch import as_batch
from zoo.snnet import StitchableNet

FIELDS = ("id", "kind", "description", "macs", "flops", "params", "latency_ms", "acc", "pareto")


@torch.no_grad()
def stitch_counts(net: StitchableNet, batches: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Correct predictions of every stitch over ``batches`` (:class:`~zoo.batch.Batch` or ``(inputs, targets)``), then the
    number of samples (``len(net) + 1`` values, counted on ``device``: no synchronisation per batch)."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(len(net) + 1, dtype=torch.long, device=device)
    for batch in batches:
        batch = as_batch(batch)
        x, y = batch.inputs.to(device), batch.targets.to(device)
        for i, logits in net.forward_all(x).items():
            counts[i] += (logits.argmax(-1) == y).sum()
        counts[-1] += len(y)
    net.train(was_training)
    return counts.cpu()


def accuracy_from_counts(counts: torch.Tensor) -> list[float]:
    return (counts[:-1].double() / counts[-1].clamp_min(1)).tolist()


def stitch_accuracy(net: StitchableNet, batches: Any, device: torch.device | str = "cpu") -> list[float]:
    """Top-1 accuracy of every stitch over ``batches``, computing shared prefixes once."""
    return accuracy_from_counts(stitch_counts(net, batches, device))


@torch.no_grad()
def stitch_latency(net: StitchableNet, x: torch.Tensor, repeats: int = 5) -> list[float]:
    """Median wall time (ms) of one forward of ``x`` through each stitch."""
    was_training = net.training
    net.eval()
    times = []
    for s in range(len(net)):
        net(x, s)  # warm-up
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(x, s)
            if x.is_cuda:
                torch.cuda.synchronize()
            runs.append((time.perf_counter() - t) * 1e3)
        times.append(statistics.median(runs))
    net.train(was_training)
    return times


def pareto_front(flops: list[float], acc: list[float]) -> list[bool]:
    """True for stitches no other stitch beats (fewer or equal FLOPs and higher accuracy)."""
    order = sorted(range(len(flops)), key=lambda i: (flops[i], -acc[i]))
    front, best = [False] * len(flops), -float("inf")
    for i in order:
        if acc[i] > best:
            front[i], best = True, acc[i]
    return front


def best_under_budget(rows: list[dict], max_flops: float | None = None, max_latency_ms: float | None = None,
                      max_macs: float | None = None) -> dict | None:
    """The most accurate row within every given budget (ties: cheaper); ``None`` if nothing fits."""
    def fits(r: dict) -> bool:
        return ((max_macs is None or r["macs"] <= max_macs) and (max_flops is None or r["flops"] <= max_flops)
                and (max_latency_ms is None or (r["latency_ms"] is not None and r["latency_ms"] <= max_latency_ms)))

    ok = [r for r in rows if fits(r)]
    return max(ok, key=lambda r: (r["acc"], -r["flops"])) if ok else None


def sweep(net: StitchableNet, batches: Any, device: torch.device | str = "cpu", latency_input: torch.Tensor | None = None,
          latency_repeats: int = 5) -> list[dict]:
    """One row per stitch (see ``FIELDS``): cost from ``net.table()``, accuracy, latency, Pareto flag."""
    acc = stitch_accuracy(net, batches, device)
    return table_rows(net, acc, stitch_latency(net, latency_input, latency_repeats) if latency_input is not None else None)


def table_rows(net: StitchableNet, acc: list[float], latency: list[float] | None = None) -> list[dict]:
    """``net.table()`` completed with each stitch's MACs, accuracy, latency (or ``None``) and Pareto flag."""
    rows, macs = net.table(), net.macs()
    latency = latency or [None] * len(rows)
    front = pareto_front(macs, acc)
    for r, m, a, t, p in zip(rows, macs, acc, latency, front):
        r.update(macs=m, acc=a, latency_ms=t, pareto=p)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in FIELDS} for r in rows)
    return path


def plot_sweep(rows: list[dict], best: dict | None = None, title: str = "SN-Net stitches"):
    """Matplotlib figure: accuracy vs MACs (multiply-adds) of every stitch, Pareto front as a line, anchors as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = sorted({r["kind"] for r in rows if r["kind"] != "anchor"})
    for kind in kinds:
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["macs"] / 1e6 for r in sel], [100 * r["acc"] for r in sel], s=14, alpha=0.6, label=f"stitches ({kind})")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["macs"])
    ax.plot([r["macs"] / 1e6 for r in front], [100 * r["acc"] for r in front], "k-", lw=1.2, label="Pareto front")
    anchors = [r for r in rows if r["kind"] == "anchor"]
    ax.scatter([r["macs"] / 1e6 for r in anchors], [100 * r["acc"] for r in anchors], marker="*", s=220, c="red", edgecolors="k", zorder=5, label="anchors")
    for r in anchors:
        ax.annotate(r["description"].split("[")[0], (r["macs"] / 1e6, 100 * r["acc"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    if best is not None:
        ax.scatter([best["macs"] / 1e6], [100 * best["acc"]], marker="o", s=120, facecolors="none", edgecolors="g", lw=2, zorder=6, label=f"best in budget (id {best['id']})")
    ax.set_xlabel("MMACs per image (multiply-adds, the papers' FLOPs)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


class StitchSweep(Callback):
    """Sweeps all stitches of ``pl_module.net`` on the validation set at the end of ``fit``.

    The module is an :class:`~zoo.snnet.SNNetModule` (or any module with a ``net`` StitchableNet and a
    ``select_stitch(id)`` method); the callback reads the net and selects the best stitch through these.

    Args:
        max_macs: budget in multiply-adds per image (the papers' "FLOPs": DeiT-S is 4.6e9) for the selected stitch.
        max_flops: budget in FLOPs per image (2 per multiply-add, ``torch.utils.flop_counter``).
        max_latency_ms: latency budget (ms per ``latency_batch_size`` images) for the selected stitch.
        csv_path: where to write the table (default: ``<log_dir>/stitch_sweep.csv``).
        measure_latency: time every stitch (needed for ``max_latency_ms``).
        latency_batch_size: images per timed forward.
        latency_repeats: timed forwards per stitch (median kept).
        limit_batches: evaluate only the samples of this many validation batches (of the datamodule's loader).
        batch_size: samples per forward of the sweep (read from memory, not through the loader).
        select_best: make the best stitch within budget the module's active stitch (``select_stitch``).

    After the sweep, ``rows`` holds the table and ``best`` the selected row.
    """

    def __init__(self, max_macs: float | None = None, max_flops: float | None = None, max_latency_ms: float | None = None, csv_path: str | None = None,
                 measure_latency: bool = True, latency_batch_size: int = 1, latency_repeats: int = 5, limit_batches: int | None = None,
                 select_best: bool = True, batch_size: int = 256):
        if max_latency_ms is not None and not measure_latency:
            raise ValueError("max_latency_ms needs measure_latency=true")
        for name, value in (("latency_batch_size", latency_batch_size), ("latency_repeats", latency_repeats), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value}: expected a positive integer")
        self.max_macs, self.max_flops, self.max_latency_ms, self.csv_path = max_macs, max_flops, max_latency_ms, csv_path
        self.measure_latency, self.latency_batch_size, self.latency_repeats = measure_latency, latency_batch_size, latency_repeats
        self.limit_batches, self.select_best, self.batch_size = limit_batches, select_best, batch_size
        self.rows: list[dict] = []
        self.best: dict | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(getattr(pl_module, "net", None), StitchableNet) or not callable(getattr(pl_module, "select_stitch", None)):
            raise TypeError(f"StitchSweep needs a module with a StitchableNet at .net and a select_stitch(id) method (zoo.snnet.SNNetModule), "
                            f"got {type(pl_module).__name__}")

    def batches(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """This rank's share of the validation samples (the first ``limit_batches`` loader batches), gathered in batches of
        ``batch_size`` from memory (:func:`~datamodules.tensor.eval_batches`); a loader without a dataset: every
        ``world_size``-th of its batches."""
        dm = trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
        limit = 1 if trainer.fast_dev_run else self.limit_batches
        world, rank = trainer.world_size, trainer.global_rank
        if isinstance(loader, DataLoader):
            per_batch = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
            return eval_batches(loader.dataset, self.batch_size, pl_module.device, rank, world, limit=None if limit is None else limit * per_batch,
                                collate_fn=loader.collate_fn)
        return (as_batch(b).ready() for i, b in enumerate(loader) if (limit is None or i < limit) and i % world == rank)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank runs this hook: each evaluates its share of the validation samples (counts summed over the ranks),
        # rank 0 times the stitches (one device, comparable times), rank 0's pick is broadcast. Only rank 0 writes.
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank must read it
        counts = stitch_counts(pl_module.net, self.batches(trainer, pl_module), pl_module.device)
        counts = trainer.strategy.reduce(counts.double().to(trainer.strategy.root_device), reduce_op="sum").cpu()
        net, latency = pl_module.net, None
        if self.measure_latency:
            if trainer.is_global_zero or sharding.is_sharded(net):  # sharded: a forward is a collective, every rank runs it
                latency = stitch_latency(net, net.example_input(self.latency_batch_size).normal_(), self.latency_repeats)
            latency = trainer.strategy.broadcast(latency, src=0)
        self.rows = table_rows(net, accuracy_from_counts(counts), latency)
        best = best_under_budget(self.rows, self.max_flops, self.max_latency_ms, self.max_macs)
        best_id = trainer.strategy.broadcast(None if best is None else best["id"], src=0)  # every rank runs rank 0's pick
        self.best = next((r for r in self.rows if r["id"] == best_id), None)
        if self.best is not None and self.select_best:
            pl_module.select_stitch(self.best["id"])
        if not trainer.is_global_zero:
            return
        path = write_csv(self.rows, self.csv_path or out_dir / "stitch_sweep.csv")
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_figure("snnet/acc_vs_flops", plot_sweep(self.rows, self.best), trainer.global_step)
        if self.best is None:
            rank_zero_info(f"StitchSweep: {len(self.rows)} stitches -> {path}; no stitch fits max_macs={self.max_macs}, max_flops={self.max_flops}, max_latency_ms={self.max_latency_ms}")
            return
        rank_zero_info(f"StitchSweep: {len(self.rows)} stitches -> {path}; best within budget: id {self.best['id']} "
                       f"({self.best['description']}, {self.best['macs'] / 1e6:.1f} MMACs, acc {self.best['acc']:.4f})")
