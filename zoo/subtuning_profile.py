"""SubTuning's finetuning profile and greedy layer selection (Kaplun et al., 2023, Sec. 2-3).

The profile finetunes each candidate layer alone (with a new head) for a fixed budget of steps
and records validation accuracy; :func:`zoo.subtuning.greedy_select` then grows (or shrinks) the
set of finetuned layers one layer at a time. Every run that starts at the same layer shares one
pass of the frozen prefix: its outputs are computed once per start layer and reused.

From YAML, the :class:`SubTuningProfile` callback profiles and selects before ``zoo fit`` trains::

    zoo fit --config configs/subtuning/profile.yaml          # or: python -m zoo.subtuning_profile --config ...

It writes ``profile.csv``, ``greedy.csv``, ``profile.png`` (also in TensorBoard under
``subtuning/profile``) and ``trainable_layers.yaml``, a snippet that ``zoo fit`` accepts::

    zoo fit --config configs/subtuning/lite0_fmnist.yaml --config <out_dir>/trainable_layers.yaml

From Python: :class:`ProfileRunner` (``runner.profile()``, ``runner.score(layers)``).
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import nn
from torch.nn import functional as F

from zoo.subtuning import LayerChain, SubTuningModule, candidate_layers, freeze_except, frozen_eval, greedy_select

FULL = "full"  # pseudo layer set: finetune every parameter (the full-finetuning baseline)


def stack_dataset(dataset: Any, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` tensors of a map-style dataset of ``(x, y[, index])`` items (a seeded subset if ``limit``)."""
    n = len(dataset)
    idx = range(n) if limit is None or limit >= n else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    items = [dataset[i] for i in idx]
    if not items:
        raise ValueError("the profile needs a non-empty training and validation set")
    if not isinstance(items[0][0], torch.Tensor):
        raise ValueError(f"the finetuning profile caches frozen features and needs tensor inputs, got {type(items[0][0]).__name__}")
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


class ProfileRunner:
    """Trains and scores SubTuned copies of one pretrained backbone on in-memory data.

    ``score(layers)`` trains ``layers`` (plus a new head) for ``steps`` AdamW steps on the training
    data and returns validation accuracy, or with ``folds > 1`` the mean held-out accuracy of a
    k-fold cross-validation on the training data (for tiny datasets). Scores are memoized, and the
    frozen prefix's outputs are computed once per start layer and split and shared by all runs.
    ``layers=FULL`` finetunes every parameter from the raw inputs (the full-finetuning baseline).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        granularity: str = "block",
        steps: int = 100,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        folds: int = 1,
        seed: int = 0,
        eval_batch_size: int = 256,
    ):
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps={steps}, batch_size={batch_size}: expected positive integers")
        if folds < 1 or folds > len(train[1]):
            raise ValueError(f"folds={folds}: expected 1 (use the validation set) up to the {len(train[1])} training samples")
        if folds == 1 and val is None:
            raise ValueError("folds=1 scores on the validation set: pass val, or set folds >= 2 for cross-validation")
        self.backbone = backbone.eval()
        self.chain = LayerChain(backbone)
        self.layers = candidate_layers(backbone, granularity)
        self.num_classes = num_classes
        self.data = {"train": train, "val": val}
        self.steps, self.batch_size, self.lr, self.weight_decay = steps, batch_size, lr, weight_decay
        self.folds, self.seed, self.eval_batch_size = folds, seed, eval_batch_size
        self.scores: dict[tuple[str, ...] | str, float] = {}
        self._features: dict[tuple[str, int], torch.Tensor] = {}

    def features(self, split: str, start: int) -> torch.Tensor:
        """The frozen prefix's outputs at block ``start`` for a split (computed once)."""
        key = (split, start)
        if key not in self._features:
            x = self.data[split][0]
            with torch.no_grad():
                self._features[key] = torch.cat([self.chain.prefix(x[i : i + self.eval_batch_size], start)[0] for i in range(0, len(x), self.eval_batch_size)])
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
        head = nn.Linear(net.num_features, self.num_classes)
        x, y = self.data["train"]
        feats = x if start is None else self.features("train", start)
        if train_idx is not None:
            feats, y = feats[train_idx], y[train_idx]
        params = [p for p in [*net.parameters(), *head.parameters()] if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.empty(0, dtype=torch.long)
        for _ in range(self.steps):
            if len(order) < min(self.batch_size, len(y)):
                order = torch.cat([order, torch.randperm(len(y), generator=gen)])
            idx, order = order[: self.batch_size], order[self.batch_size :]
            h = feats[idx]
            out = net(h) if start is None else chain.suffix(h, ((), {}), h, start)
            loss = F.cross_entropy(head(out), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return net.eval(), head.eval(), start

    @torch.no_grad()
    def accuracy(self, net: nn.Module, head: nn.Module, start: int | None, split: str, idx: torch.Tensor | None = None) -> float:
        """Accuracy on a split of a model from :meth:`fit` (``start=None``: fully finetuned, raw inputs)."""
        chain = LayerChain(net)
        x, y = self.data[split]
        feats = x if start is None else self.features(split, start)
        if idx is not None:
            feats, y = feats[idx], y[idx]
        correct = 0
        for i in range(0, len(y), self.eval_batch_size):
            h = feats[i : i + self.eval_batch_size]
            out = net(h) if start is None else chain.suffix(h, ((), {}), h, start)
            correct += int((head(out).argmax(-1) == y[i : i + self.eval_batch_size]).sum())
        return correct / len(y)

    def score(self, layers: Sequence[str] | str) -> float:
        """Validation (or cross-validated) accuracy of finetuning ``layers``; memoized."""
        key = layers if layers == FULL else tuple(layers)
        if key not in self.scores:
            if self.folds == 1:
                self.scores[key] = self.accuracy(*self.fit(layers), "val")
            else:
                n = len(self.data["train"][1])
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 7))
                accs = []
                for fold in perm.chunk(self.folds):
                    keep = perm[~torch.isin(perm, fold)]
                    accs.append(self.accuracy(*self.fit(layers, keep), "train", fold))
                self.scores[key] = sum(accs) / len(accs)
        return self.scores[key]

    def profile(self) -> dict[str, float]:
        """The finetuning profile: accuracy of finetuning each candidate layer alone (``"head"``: none)."""
        result = {"head": self.score(())}
        for name in self.layers:
            result[name] = self.score((name,))
        return result

    def select(self, k: int | None = None, epsilon: float = 0.01, start: str = "head") -> tuple[tuple[str, ...], float, list[dict[str, Any]]]:
        """Profile, then the greedy selection (see :func:`zoo.subtuning.greedy_select`)."""
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


class SubTuningProfile(Callback):
    """Profile the candidate layers and pick ``trainable_layers`` greedily before training starts.

    On ``setup`` (rank 0, result broadcast), it scores every layer of the module's pretrained
    backbone on the datamodule's ``train_set``/``val_set``, runs the greedy selection, writes the
    outputs (see :func:`write_outputs`) to ``out_dir`` (default: the logger's directory) and a
    TensorBoard figure, then sets the module's ``trainable_layers`` to the chosen ones.
    Under ``fast_dev_run`` each run trains for one step on a few samples.

    YAML::

        trainer:
          callbacks:
            - class_path: zoo.subtuning_profile.SubTuningProfile
              init_args: {steps: 100, batch_size: 32, lr: 0.001, k: 3, epsilon: 0.01, start: head}
    """

    def __init__(
        self,
        steps: int = 100,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        k: int | None = 3,
        epsilon: float = 0.01,
        start: str = "head",
        folds: int = 1,
        max_val_samples: int | None = 1000,
        seed: int = 0,
        out_dir: str | None = None,
    ):
        if start not in ("head", "best", "all"):
            raise ValueError(f"start={start!r}: expected 'head', 'best' or 'all'")
        if steps < 1 or batch_size < 1 or folds < 1 or (k is not None and k < 1) or epsilon < 0:
            raise ValueError(f"steps={steps}, batch_size={batch_size}, folds={folds}, k={k}, epsilon={epsilon}: expected positive steps/batch_size/folds/k and epsilon >= 0")
        self.kwargs = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "folds": folds, "seed": seed}
        self.k, self.epsilon, self.start = k, epsilon, start
        self.max_val_samples, self.out_dir = max_val_samples, out_dir
        self.chosen: list[str] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.chosen is not None:
            return
        if trainer.ckpt_path:  # resuming: reuse the selection stored in the checkpoint
            ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=False)
            self.chosen = ckpt.get("callbacks", {}).get(self.state_key, {}).get("chosen")
            if self.chosen is not None:
                pl_module.set_trainable_layers(self.chosen)
                return
        if not isinstance(pl_module, SubTuningModule):
            raise ValueError(f"SubTuningProfile needs a zoo.subtuning.SubTuningModule, got {type(pl_module).__name__}")
        dm = trainer.datamodule
        if dm is None or getattr(dm, "train_set", None) is None or getattr(dm, "val_set", None) is None:
            raise ValueError("SubTuningProfile needs a zoo datamodule with train_set and val_set")
        chosen = None
        if trainer.is_global_zero:
            chosen = self.run(trainer, pl_module, dm)
        self.chosen = trainer.strategy.broadcast(chosen, src=0)
        pl_module.set_trainable_layers(self.chosen)

    def run(self, trainer, pl_module: SubTuningModule, dm) -> list[str]:
        kwargs, max_val = dict(self.kwargs), self.max_val_samples
        limit = None
        if trainer.fast_dev_run:
            kwargs["steps"], limit, max_val = 1, 4 * dm.num_classes, 16
        train = stack_dataset(dm.train_set, limit, kwargs["seed"])
        # A smoke test (fast_dev_run) on a tiny stand-in dataset may have no validation images.
        val = stack_dataset(dm.val_set if len(dm.val_set) or not trainer.fast_dev_run else dm.train_set, max_val, kwargs["seed"])
        backbone = copy.deepcopy(pl_module.backbone).cpu()
        runner = ProfileRunner(backbone, pl_module.num_classes, train, val, granularity=pl_module.hparams.granularity, **kwargs)
        chosen, best, history = runner.select(self.k, self.epsilon, self.start)
        profile = runner.profile()
        out_dir = self.out_dir or (trainer.logger.log_dir if trainer.logger is not None and trainer.logger.log_dir else trainer.default_root_dir)
        write_outputs(Path(out_dir) / "subtuning_profile", profile, history, chosen, best, pl_module.hparams.granularity)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("subtuning/profile", profile_figure(profile, chosen))
        return list(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen = state_dict.get("chosen")


if __name__ == "__main__":
    import sys

    from cli import main

    main(["fit", *sys.argv[1:]])
