"""The standard continual-learning metrics from the accuracy matrix, as scalars, CSV and a TensorBoard heatmap.

``R[i, j]`` is the test accuracy on task ``j`` after training task ``i`` (``j <= i``), filled by the
:mod:`zoo.continual` modules at each task end (announced to callbacks by
:meth:`zoo.continual.ContinualClassifier.announce_task_end`, which calls :meth:`ContinualMetrics.on_task_end`). After task ``i``:

- average accuracy ``A_i = mean_{j<=i} R[i, j]``;
- average forgetting ``F_i = mean_{j<i} (max_{j<=l<i} R[l, j] - R[i, j])`` (Chaudhry et al., ECCV 2018);
- backward transfer ``BWT_i = mean_{j<i} (R[i, j] - R[j, j])`` (Lopez-Paz & Ranzato, NeurIPS 2017).

Forgetting and BWT are 0 after the first task (nothing to forget yet).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def average_accuracy(R: torch.Tensor) -> float:
    """Mean accuracy over the tasks seen, after the last row's task."""
    i = R.shape[0] - 1
    return R[i, :i + 1].mean().item()


def average_forgetting(R: torch.Tensor) -> float:
    """Mean drop from each earlier task's best accuracy to its accuracy now (Chaudhry et al. 2018)."""
    i = R.shape[0] - 1
    if i == 0:
        return 0.0
    return torch.stack([R[j:i, j].max() - R[i, j] for j in range(i)]).mean().item()


def backward_transfer(R: torch.Tensor) -> float:
    """Mean change of each earlier task's accuracy since just after learning it (Lopez-Paz & Ranzato 2017)."""
    i = R.shape[0] - 1
    if i == 0:
        return 0.0
    return (R[i, :i] - R.diagonal()[:i]).mean().item()


def stream_metrics(R: torch.Tensor) -> dict[str, float]:
    """``avg_acc``, ``forgetting`` and ``bwt`` of the square matrix ``R`` (rows = tasks trained so far)."""
    return {"avg_acc": average_accuracy(R), "forgetting": average_forgetting(R), "bwt": backward_transfer(R)}


class ContinualMetrics(Callback):
    """After each task: log ``continual/avg_acc``, ``continual/forgetting``, ``continual/bwt`` (step = task), write
    ``acc_matrix.csv`` and ``continual_metrics.csv`` to the log dir, draw the matrix as a TensorBoard heatmap;
    print the final metrics at the end of the stream. Under DDP every rank calls ``on_task_end`` (the matrix is the
    same on all ranks: each tests on the whole test set); only rank 0 writes.

    YAML::

        trainer:
          callbacks:
            - class_path: callbacks.continual_metrics.ContinualMetrics
              init_args: {heatmap: true}
    """

    def __init__(self, heatmap: bool = True):
        self.heatmap = heatmap

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "announce_task_end", None)):
            raise ValueError(f"ContinualMetrics reads the accuracy matrix that a zoo.continual module (ContinualClassifier, ER, DER, ...) "
                             f"fills at each task end; {type(pl_module).__name__} keeps none")

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int, final: bool) -> None:
        R = pl_module.acc_matrix[:task + 1, :task + 1]
        metrics = stream_metrics(R)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"continual/{k}": v for k, v in metrics.items()}, step=task)
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank must read it
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "acc_matrix.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["after_task"] + [f"task_{j}" for j in range(task + 1)])
            writer.writerows([[i] + [f"{v:.4f}" for v in R[i, :i + 1].tolist()] for i in range(task + 1)])
        with open(out / "continual_metrics.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["after_task", *metrics])
            writer.writerows([[i, *(f"{v:.4f}" for v in stream_metrics(R[:i + 1, :i + 1]).values())] for i in range(task + 1)])
        if self.heatmap and isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_figure("continual/acc_matrix", self.figure(R), global_step=task)
        if final:
            print(f"\ncontinual: after {task + 1} task(s): average accuracy {metrics['avg_acc']:.4f}, "
                  f"forgetting {metrics['forgetting']:.4f}, BWT {metrics['bwt']:+.4f}; matrix in {out / 'acc_matrix.csv'}")

    @staticmethod
    def figure(R: torch.Tensor):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = R.shape[0]
        fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.5 * n))
        image = ax.imshow(R.numpy(), vmin=0, vmax=1, cmap="viridis")
        for i in range(n):
            for j in range(i + 1):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w" if R[i, j] < 0.6 else "k", fontsize=8)
        ax.set(xlabel="tested on task", ylabel="after training task", xticks=range(n), yticks=range(n))
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        return fig
