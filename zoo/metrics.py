"""Accuracy kept as device counters: what :class:`~zoo.classifier.Classifier` logs for every split."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection


class TopKAccuracy(Metric):
    """Micro top-k accuracy kept as two counters on the device (summed over ranks): the value of torchmetrics'
    ``MulticlassAccuracy(average="micro", top_k=k)`` at a third of its per-batch cost (no per-class stat scores)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, top_k: int = 1):
        super().__init__()
        self.top_k = top_k
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor | None = None, target: torch.Tensor | None = None,
               counts: tuple[torch.Tensor, int] | None = None) -> None:
        """Count the hits of ``preds`` (logits) against ``target``, or add ``counts`` = ``(hits, samples)`` counted
        elsewhere with :meth:`hits` (the zoo's modules count many batches at once: torchmetrics'
        per-call bookkeeping costs more than the count itself for a small model)."""
        correct, total = counts if counts is not None else (self.hits(preds, target), target.numel())
        # out of place: a state reset under inference mode (validation) cannot be updated in place in training
        self.correct = self.correct + correct
        self.total = self.total + total

    def hits(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """How many of ``target`` are in the top ``k`` of ``preds`` (a device tensor: no host sync). Top-1 is the
        argmax; for ``k`` > 1 a target is in the top ``k`` when at most ``k`` logits (itself included) are at least its
        own: ``topk``'s answer without its sort (7x faster for 10 classes on a CPU), where a tie with the target
        counts against it (``topk`` breaks ties arbitrarily; a logit masked to -inf is never a hit)."""
        if self.top_k == 1:
            return (preds.argmax(-1) == target).sum()
        at_least = (preds >= preds.gather(-1, target.unsqueeze(-1))).sum(-1)
        return ((at_least >= 1) & (at_least <= self.top_k)).sum()  # (0: a NaN target logit)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy, and top-5 where there are more than 5 classes."""
    metrics = {"acc": TopKAccuracy(top_k=1)}
    if num_classes > 5:
        metrics["acc_top5"] = TopKAccuracy(top_k=5)
    # no compute groups: torchmetrics would merge top-1 and top-5 if their counters happened to agree after the
    # first batch (e.g. all of it right), and then update only one of them
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
