"""SubTuning's finetuning profile and greedy layer selection (Kaplun et al., 2023, Sec. 2-3).

The profile finetunes each candidate layer alone (with a new head) with a :class:`~zoo.subtuning.recipe.ScoringRecipe`
(default: the official one, 10 epochs and 5-fold cross-validation; ``fast``: 100 steps) and records its
accuracy; :func:`greedy_select` then grows (or shrinks) the set of finetuned layers one layer at a time.
Every run that starts at the same layer shares one pass of the frozen prefix: its outputs are computed once
per start layer and reused.

From YAML, the callback :class:`callbacks.subtuning_profile.SubTuningProfile` profiles and selects before
``zoo fit`` trains (``configs/subtuning/profile.yaml``). From Python: :class:`ProfileRunner`
(``runner.profile()``, ``runner.score(layers)``, ``runner.select(k)``).
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset

from datamodules.tensor import eval_batches
from zoo.subtuning.cache import cache_placement, empty_rows
from zoo.subtuning.chain import LayerChain
from zoo.subtuning.layers import candidate_layers, freeze_except, frozen_eval
from zoo.subtuning.recipe import ScoringRecipe, fold_indices

STARTS = ("head", "best", "all", "both")  # "both": the official start (see greedy_select)


def greedy_select(
    layers: Sequence[str],
    score: Callable[[tuple[str, ...]], float],
    k: int | None = None,
    epsilon: float = 0.01,
    start: str = "both",
    profile: Mapping[str, float] | None = None,
) -> tuple[tuple[str, ...], float, list[dict[str, Any]]]:
    """The paper's greedy layer selection.

    ``start="head"`` begins from no layer (the head alone), ``"best"`` from the profile's best
    layer, ``"all"`` from every layer (then each round *removes* a layer). ``"both"`` is the
    official code's start (talswisa/SubTuning ``greedy_start``): score no layer and every layer,
    then search from the better one (adding from no layer, removing from all; a tie goes to no
    layer), with ``k`` read for that direction. Each round scores every
    one-layer change of the current set with ``score`` and keeps the best; it stops at ``k``
    layers, when no change is left, or when the
    round's best accuracy falls below the best so far minus ``epsilon``.
    ``k`` is the largest set size (``head``/``best``) or the smallest (``all``).

    Returns ``(best set, its accuracy, history)``; the best set is the smallest among the
    highest-scoring sets seen. ``history`` has one row per scored set.
    """
    if start not in STARTS:
        raise ValueError(f"start={start!r}: expected one of {', '.join(map(repr, STARTS))}")
    if k is not None and k < 1:
        raise ValueError(f"k={k}: expected a positive number of layers or null")
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon}: expected a non-negative number")
    order = {n: i for i, n in enumerate(layers)}
    history: list[dict[str, Any]] = []
    memo: dict[tuple[str, ...], float] = {}

    def evaluate(s: tuple[str, ...], rnd: int) -> float:
        if s not in memo:
            memo[s] = float(score(s))
            history.append({"round": rnd, "layers": s, "val_acc": memo[s]})
        return memo[s]

    if start == "both":  # official: all layers if strictly better than none, else none
        start = "all" if evaluate(tuple(layers), 0) > evaluate((), 0) else "head"
    if start == "best":
        if not profile:
            raise ValueError("start='best' needs the finetuning profile (accuracy per layer)")
        current = (max(layers, key=lambda n: profile[n]),)
    else:
        current = tuple(layers) if start == "all" else ()

    def done() -> bool:
        if k is None:
            return False
        return len(current) <= k if start == "all" else len(current) >= k

    best_set, best = current, evaluate(current, 0)
    rounds = 0
    while not done():
        if start == "all":
            options = [tuple(n for n in current if n != drop) for drop in current]
        else:
            options = [tuple(sorted(current + (n,), key=order.__getitem__)) for n in layers if n not in current]
        if not options:
            break
        rounds += 1
        scores = [(evaluate(s, rounds), s) for s in options]
        acc, chosen = max(scores, key=lambda t: t[0])
        if acc < best - epsilon:
            break
        current = chosen
        if acc > best or (acc == best and len(chosen) < len(best_set)):
            best_set, best = chosen, acc
    return best_set, best, history


FULL = "full"  # pseudo layer set: finetune every parameter (the full-finetuning baseline)


def stack_dataset(dataset: Any, limit: int | None = None, seed: int = 0, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` tensors of a map-style dataset of :class:`~zoo.batch.Batch` items (a seeded subset if ``limit``),
    read from memory in large gathered batches (:func:`~datamodules.tensor.eval_batches`)."""
    n = len(dataset)
    idx = range(n) if limit is None or limit >= n else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    if not len(idx):
        raise ValueError("the profile needs a non-empty training and validation set")
    batches = list(eval_batches(Subset(dataset, idx), batch_size))
    if not isinstance(batches[0].inputs, torch.Tensor):
        raise ValueError(f"the finetuning profile caches frozen features and needs tensor inputs, got {type(batches[0].inputs).__name__}")
    return torch.cat([b.inputs for b in batches]), torch.cat([torch.as_tensor(b.targets).long() for b in batches])


class ProfileRunner:
    """Trains and scores SubTuned copies of one pretrained backbone on in-memory data.

    ``score(layers)`` trains ``layers`` (plus a new head) with ``recipe`` (a :class:`ScoringRecipe` or a preset
    name; default ``official``: 10 epochs, AdamW lr 1e-4, cosine, batch 256, 5 folds; ``fast``: 100 AdamW steps
    at lr 1e-3, batch 32) and returns validation accuracy, or with ``folds > 1`` the mean held-out accuracy of a
    k-fold cross-validation on the training data. ``steps``, ``epochs``, ``batch_size``, ``lr``, ``weight_decay``
    and ``folds`` override the recipe's fields when given (``steps`` replaces its epochs). Scores are memoized, and the
    frozen prefix's outputs are computed once per start layer and split and shared by all runs.
    ``layers=FULL`` finetunes every parameter from the raw inputs (the full-finetuning baseline).
    Everything runs on the backbone's device (its first parameter's); the data stay where they are
    and are moved there batch by batch. The cached prefix outputs live where ``cache_device`` says
    (:func:`~zoo.subtuning.cache.cache_placement`; ``auto``: on that device unless they are large, then in CPU
    memory, pinned for a GPU).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        granularity: str = "block",
        recipe: ScoringRecipe | str = "official",
        steps: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        folds: int | None = None,
        seed: int = 0,
        eval_batch_size: int = 256,
        epochs: int | None = None,
        cache_device: str | None = "auto",
    ):
        self.recipe = ScoringRecipe.of(recipe, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, folds=folds)
        folds = self.recipe.folds
        if folds > len(train[1]):
            raise ValueError(f"folds={folds}: expected 1 (use the validation set) up to the {len(train[1])} training samples")
        if folds == 1 and val is None:
            raise ValueError("folds=1 scores on the validation set: pass val, or set folds >= 2 for cross-validation")
        self.backbone = backbone.eval()
        self.device = next(iter([*backbone.parameters(), *backbone.buffers()]), torch.empty(0)).device
        self.chain = LayerChain(backbone)
        self.layers = candidate_layers(backbone, granularity)
        self.num_classes = num_classes
        self.data = {"train": train, "val": val}
        self.folds, self.seed, self.eval_batch_size = folds, seed, eval_batch_size
        cache_placement(cache_device, self.device)  # a bad name fails here
        self.cache_device = cache_device
        self.scores: dict[tuple[str, ...] | str, float] = {}
        self._features: dict[tuple[str, int], torch.Tensor] = {}

    def features(self, split: str, start: int) -> torch.Tensor:
        """The frozen prefix's outputs at block ``start`` for a split (computed once, kept where ``cache_device`` says)."""
        key = (split, start)
        if key not in self._features:
            x, out = self.data[split][0], None
            with torch.no_grad():
                for i in range(0, len(x), self.eval_batch_size):
                    h = self.chain.prefix(x[i : i + self.eval_batch_size].to(self.device), start)[0]
                    if out is None:
                        device, pin = cache_placement(self.cache_device, h.device, len(x) * h[0].numel() * h.element_size())
                        out = empty_rows(len(x), h, device, pin)
                    out[i : i + len(h)] = h
            self._features[key] = out
        return self._features[key]

    def add_split(self, name: str, data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.data[name] = data

    def fit(self, layers: Sequence[str] | str, train_idx: torch.Tensor | None = None) -> tuple[nn.Module, nn.Module, int | None]:
        """Train a copy of the backbone with ``layers`` finetuned; returns ``(backbone, head, start block)``."""
        net = copy.deepcopy(self.backbone)
        chain = LayerChain(net)
        if layers == FULL:
            start = None
            net.requires_grad_(True).train()
        else:
            modules = freeze_except(net, layers)
            frozen_eval(net, modules)
            start = chain.start_of(layers)
        torch.manual_seed(self.seed)
        head = nn.Linear(net.num_features, self.num_classes, device=self.device)
        x, y = self.data["train"]
        feats = x if start is None else self.features("train", start)
        if train_idx is not None:
            feats, y = feats[train_idx.to(feats.device)], y[train_idx.to(y.device)]
        opt, schedule = self.recipe.build(p for p in [*net.parameters(), *head.parameters()] if p.requires_grad)
        for unit in self.recipe.units(len(y), torch.Generator().manual_seed(self.seed)):  # one epoch, or one step
            for idx in unit:
                h = feats[idx.to(feats.device)].to(self.device)
                out = net(h) if start is None else chain.suffix(h, ((), {}), h, start)
                loss = F.cross_entropy(head(out), y[idx.to(y.device)].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if schedule is not None:
                schedule.step()
        return net.eval(), head.eval(), start

    @torch.no_grad()
    def accuracy(self, net: nn.Module, head: nn.Module, start: int | None, split: str, idx: torch.Tensor | None = None) -> float:
        """Accuracy on a split of a model from :meth:`fit` (``start=None``: fully finetuned, raw inputs)."""
        chain = LayerChain(net)
        x, y = self.data[split]
        feats = x if start is None else self.features(split, start)
        if idx is not None:
            feats, y = feats[idx.to(feats.device)], y[idx.to(y.device)]
        correct = 0
        for i in range(0, len(y), self.eval_batch_size):
            h = feats[i : i + self.eval_batch_size].to(self.device)
            out = net(h) if start is None else chain.suffix(h, ((), {}), h, start)
            correct += int((head(out).argmax(-1) == y[i : i + self.eval_batch_size].to(self.device)).sum())
        return correct / len(y)

    def score(self, layers: Sequence[str] | str) -> float:
        """Validation (or cross-validated) accuracy of finetuning ``layers``; memoized."""
        key = layers if layers == FULL else tuple(layers)
        if key not in self.scores:
            if self.folds == 1:
                self.scores[key] = self.accuracy(*self.fit(layers), "val")
            else:
                n = len(self.data["train"][1])
                accs = []
                folds = fold_indices(n, self.folds, self.seed + 7)
                for i, fold in enumerate(folds):  # train on the other folds, concatenated (as the official split)
                    accs.append(self.accuracy(*self.fit(layers, torch.cat(folds[:i] + folds[i + 1 :])), "train", fold))
                self.scores[key] = sum(accs) / len(accs)
        return self.scores[key]

    def profile(self) -> dict[str, float]:
        """The finetuning profile: accuracy of finetuning each candidate layer alone (``"head"``: none)."""
        result = {"head": self.score(())}
        for name in self.layers:
            result[name] = self.score((name,))
        return result

    def select(self, k: int | None = None, epsilon: float = 0.01, start: str = "both") -> tuple[tuple[str, ...], float, list[dict[str, Any]]]:
        """Profile, then the greedy selection (see :func:`greedy_select`)."""
        profile = self.profile()
        return greedy_select(self.layers, self.score, k=k, epsilon=epsilon, start=start, profile=profile)


def profile_figure(profile: dict[str, float], chosen: Sequence[str] = ()):
    """The paper's finetuning-profile plot: accuracy of finetuning each layer alone, head-only line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n in profile if n != "head"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 2), 3.2))
    colors = ["tab:orange" if n in chosen else "tab:blue" for n in layers]
    ax.plot(range(len(layers)), [profile[n] for n in layers], color="0.6", zorder=1)
    ax.scatter(range(len(layers)), [profile[n] for n in layers], c=colors, zorder=2)
    ax.axhline(profile["head"], ls="--", color="0.3", label="head only (linear probe)")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("val accuracy")
    ax.set_title("SubTuning finetuning profile (orange: chosen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_outputs(out_dir: str | Path, profile: dict[str, float], history: list[dict[str, Any]], chosen: Sequence[str], best: float, granularity: str) -> Path:
    """``profile.csv``, ``greedy.csv``, ``profile.png`` and ``trainable_layers.yaml`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "profile.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "layer", "val_acc"])
        for i, (name, acc) in enumerate(profile.items()):
            w.writerow([i - 1, name, f"{acc:.4f}"])
    with open(out / "greedy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "layers", "val_acc"])
        for row in history:
            w.writerow([row["round"], " ".join(row["layers"]) or "head", f"{row['val_acc']:.4f}"])
    fig = profile_figure(profile, chosen)
    fig.savefig(out / "profile.png", dpi=120)
    (out / "trainable_layers.yaml").write_text(
        f"# Greedy SubTuning selection (val acc {best:.4f}). Use: zoo fit --config <fit.yaml> --config {out / 'trainable_layers.yaml'}\n"
        f"model:\n  init_args:\n    granularity: {granularity}\n    trainable_layers: [{', '.join(chosen)}]\n"
    )
    return out
