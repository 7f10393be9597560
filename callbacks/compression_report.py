"""Compression report (issue 20): accuracy, size on disk and CPU latency after each stage of a compression run.

One row per stage of ``distill -> prune -> quantise`` in one fit:

=================  =========================  ===========================================================
stage              recorded                   model
=================  =========================  ===========================================================
``start``          ``on_fit_start``           the student before training (dense float)
``distill_prune``  ``on_train_end``           after distillation + gradual pruning (float, masks baked in)
``int8``           ``on_fit_end``             after post-training quantisation (or QAT's conversion)
=================  =========================  ===========================================================

Each row: the precision (``float32`` or the int8 scheme), whether the int8 model runs compiled (the quantisation
callback's ``compile: true``; CPU int8 is fast only compiled), top-1 accuracy on the validation split, ``bytes`` (the
backbone's state_dict as ``torch.save`` writes it, int8 tensors as plain int8), ``gzip_bytes`` (the same file
gzip-compressed: where pruning's zeros pay off on disk), the share of zero weights, and CPU latency (median ms) at batch 1 and at the validation batch size. The table goes
to the log (text, and ``compression_report.md`` in the logger's folder) and, with a TensorBoard logger, to its text
tab and as a figure. List this callback after the pruning and quantisation callbacks (checked in ``setup``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from zoo.batch import as_batch

FIELDS = ("stage", "precision", "compiled", "accuracy", "bytes", "gzip_bytes", "sparsity", "latency_ms_b1", "latency_ms_batch")


def _take(x: Any, n: int) -> Any:
    """The first ``n`` samples of a batch's tensor or dict of tensors."""
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, dict):
        return {k: _take(v, n) for k, v in x.items()}
    return x


def disk_bytes(module: torch.nn.Module, compressed: bool = True) -> tuple[int, int | None]:
    """``(bytes, gzip_bytes)`` of ``module``'s state_dict saved with ``torch.save`` (gzip level 6; ``None`` if not
    ``compressed``: gzip takes about 5 s per 100 MB on one core)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    data = buf.getvalue()
    return len(data), (len(gzip.compress(data, compresslevel=6)) if compressed else None)


def sparsity(module: torch.nn.Module) -> float:
    """Share of exact zeros among the weights of rank >= 2 (dequantised where int8)."""
    zeros = total = 0
    for p in module.parameters():
        if p.ndim >= 2:
            data = p.qdata if hasattr(p, "qdata") else p.detach()
            zeros, total = zeros + int((data == 0).sum()), total + data.numel()
    return zeros / max(total, 1)


class CompressionReport(Callback):
    """Records accuracy, size on disk and CPU latency after each compression stage (see the module docstring).

    Args:
        eval_batches: validation batches for accuracy (null: the whole split; fast_dev_run: 1).
        latency_repeats: timed forwards per latency (median; 2 untimed warm-ups first).
        backbone_only: measure sizes on ``module.backbone`` (teachers, projectors and loss modules excluded);
            ``false``: the whole module's state_dict.
        compressed: also measure the gzip-compressed size (``gzip_bytes``; null when off).
    """

    def __init__(self, eval_batches: int | None = None, latency_repeats: int = 20, backbone_only: bool = True, compressed: bool = True):
        if eval_batches is not None and eval_batches < 1:
            raise ValueError(f"eval_batches={eval_batches}: expected at least 1 batch (or null: the whole validation split)")
        if latency_repeats < 1:
            raise ValueError(f"latency_repeats={latency_repeats}: expected at least 1")
        self.eval_batches, self.latency_repeats, self.backbone_only = eval_batches, latency_repeats, backbone_only
        self.compressed = compressed
        self.rows: list[dict[str, Any]] = []

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from callbacks.pruning.base import MaskedPruning
        from callbacks.quantize import PostTrainingQuantization, QuantizationAwareTraining

        mine = trainer.callbacks.index(self)
        late = [type(c).__name__ for c in trainer.callbacks[mine + 1:]
                if isinstance(c, (MaskedPruning, PostTrainingQuantization, QuantizationAwareTraining))]
        if late:
            raise ValueError(f"{', '.join(late)} comes after CompressionReport in the callbacks: list the report last, so that its "
                             "rows see the pruned (masks baked in) and the quantised model")
        if trainer.datamodule is None:
            raise ValueError("CompressionReport measures accuracy on the datamodule's validation split: give a `data:` datamodule")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []
        self.record(trainer, pl_module, "start")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record(trainer, pl_module, "distill_prune")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from zoo.quantize import Quantize

        if any(isinstance(t, Quantize) for t in getattr(pl_module, "surgery", [])):
            self.record(trainer, pl_module, "int8")
        self.publish(trainer)

    # -- measuring -----------------------------------------------------------------------------------------------
    def _batches(self, trainer: Trainer, pl_module: LightningModule) -> list:
        limit = 1 if trainer.fast_dev_run else self.eval_batches
        out = []
        for i, batch in enumerate(trainer.datamodule.val_dataloader()):
            if limit is not None and i >= limit:
                break
            out.append(as_batch(pl_module.transfer_batch_to_device(batch, pl_module.device, 0)).ready())
        if not out:
            raise ValueError("CompressionReport: the validation split has 0 batches")
        return out

    @torch.no_grad()
    def record(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Any]:
        training = pl_module.training
        pl_module.eval()
        run = getattr(pl_module, "batch_logits", None) or (lambda b: pl_module(b.inputs))
        batches = self._batches(trainer, pl_module)
        correct = total = 0
        for b in batches:
            logits = run(b)
            correct += int((logits.argmax(-1) == b.targets).sum())
            total += int(b.targets.numel())
        one = dataclasses.replace(batches[0], inputs=_take(batches[0].inputs, 1), targets=_take(batches[0].targets, 1))
        target = pl_module.backbone if self.backbone_only and hasattr(pl_module, "backbone") else pl_module
        size, packed = disk_bytes(target, self.compressed)
        quantize = next((t for t in getattr(pl_module, "surgery", []) if type(t).__name__ == "Quantize"), None)
        row = {"stage": stage, "precision": quantize.scheme if quantize else "float32",
               "compiled": bool(quantize and getattr(quantize, "compile", False)), "accuracy": correct / max(total, 1), "bytes": size,
               "gzip_bytes": packed, "sparsity": sparsity(target),
               "latency_ms_b1": self._latency(run, one), "latency_ms_batch": self._latency(run, batches[0])}
        pl_module.train(training)
        self.rows.append(row)
        return row

    def _latency(self, run, batch) -> float:
        for _ in range(2):
            run(batch)
        times = []
        for _ in range(self.latency_repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    # -- output --------------------------------------------------------------------------------------------------
    def table(self) -> str:
        """The rows as a Markdown table."""
        lines = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
        for r in self.rows:
            cells = [r["stage"], r["precision"], "yes" if r["compiled"] else "no", f"{r['accuracy']:.4f}", f"{r['bytes'] / 1e6:.3f} MB", "-" if r["gzip_bytes"] is None else f"{r['gzip_bytes'] / 1e6:.3f} MB",
                     f"{r['sparsity']:.3f}", f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_batch']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def publish(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        text = self.table()
        rank_zero_info("CompressionReport (accuracy on the validation split, sizes of the backbone's state_dict, CPU latency "
                       "in ms):\n" + text)
        logger = trainer.logger
        if logger is None:
            return
        if getattr(logger, "log_dir", None):
            Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(logger.log_dir) / "compression_report.md").write_text(text + "\n")
        for i, r in enumerate(self.rows):
            logger.log_metrics({f"compression/{k}": float(v) for k, v in r.items() if k not in ("stage", "precision", "compiled") and v is not None}, step=i)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("compression/report", text, trainer.global_step)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("compression/report", self.figure(), trainer.global_step)

    def figure(self):
        """Bars per stage: accuracy, size on disk (raw and gzip), batch-1 latency."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stages = [r["stage"] for r in self.rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        axes[0].bar(stages, [r["accuracy"] for r in self.rows])
        axes[0].set_title("val top-1")
        x = range(len(stages))
        axes[1].bar([i - 0.2 for i in x], [r["bytes"] / 1e6 for r in self.rows], width=0.4, label="state_dict")
        if all(r["gzip_bytes"] is not None for r in self.rows):
            axes[1].bar([i + 0.2 for i in x], [r["gzip_bytes"] / 1e6 for r in self.rows], width=0.4, label="gzip")
        axes[1].set_xticks(list(x), stages)
        axes[1].set_title("size on disk (MB)")
        axes[1].legend()
        axes[2].bar(stages, [r["latency_ms_b1"] for r in self.rows])
        axes[2].set_title("CPU latency, batch 1 (ms)")
        fig.tight_layout()
        return fig
