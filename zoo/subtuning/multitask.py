"""Several SubTuned models of one pretrained backbone as one network (shared frozen trunk, one branch per task)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from zoo.subtuning.layers import covered
from zoo.subtuning.module import SubTuningModule


class MultiTaskSubTuned(nn.Module):
    """Several SubTuned models of one pretrained backbone as one network.

    The frozen trunk runs once up to the earliest first-finetuned layer; each task then branches
    at its own first finetuned layer (tasks branching at the same layer share everything before
    it) and runs its finetuned blocks, the shared frozen blocks between them, the tail and its
    head. ``forward`` returns each task's logits (a list, or a dict for a mapping of tasks) and
    equals running each model alone.

    Example::

        multi = MultiTaskSubTuned({"fmnist": load_zoo_module("a.ckpt"), "digits": load_zoo_module("b.ckpt")})
        logits = multi(images)   # {"fmnist": ..., "digits": ...}
    """

    def __init__(self, tasks: Sequence[SubTuningModule] | Mapping[str, SubTuningModule]):
        super().__init__()
        self.keys = list(tasks.keys()) if isinstance(tasks, Mapping) else None
        models = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
        if not models:
            raise ValueError("MultiTaskSubTuned needs at least one SubTuningModule")
        for m in models:
            if not isinstance(m, SubTuningModule):
                raise ValueError(f"MultiTaskSubTuned takes SubTuningModule models, got {type(m).__name__}")
        names = models[0].chain.names
        for k, m in enumerate(models):
            if m.chain.names != names:
                raise ValueError(f"task {k} has a different backbone architecture ({type(m.chain.root).__name__}) than task 0")
        self._check_shared(models)
        self.chain = models[0].chain  # prefix and tail are frozen in every task
        self.trunk = models[0].backbone
        # A frozen copy of every block that some task leaves frozen, shared by all tasks that do.
        self.shared = [next((m.chain.layers[i] for m in models if not covered(n, m.trainable_names)), None) for i, n in enumerate(names)]
        self.task_layers = [[m.chain.layers[i] if covered(n, m.trainable_names) else self.shared[i] for i, n in enumerate(names)] for m in models]
        self.shared_blocks = nn.ModuleList(b for b in self.shared if b is not None)
        self.branches = nn.ModuleList(nn.ModuleList(m.trainable_modules) for m in models)
        self.heads = nn.ModuleList(m.head for m in models)
        self.starts = [m.start for m in models]
        self.eval()

    @staticmethod
    def _check_shared(models: list[SubTuningModule]) -> None:
        first: dict[str, tuple[int, torch.Tensor]] = {}
        for k, m in enumerate(models):
            root = m.chain.root
            for name, t in [*root.named_parameters(), *root.named_buffers()]:
                if covered(name, m.trainable_names):
                    continue
                if name not in first:
                    first[name] = (k, t)
                elif not torch.equal(t, first[name][1]):
                    raise ValueError(f"tasks {first[name][0]} and {k} do not share the frozen backbone: {name} differs (were they finetuned from the same weights?)")

    def forward(self, x: Any) -> list[torch.Tensor] | dict[str, torch.Tensor]:
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        outputs: list[torch.Tensor | None] = [None] * len(order)
        pos = self.starts[order[0]]
        h, ctx = self.chain.prefix(x, pos)
        for t in order:
            h = self.chain.run(h, ctx, pos, self.starts[t], self.shared)  # advance the shared trunk to this task's branch
            pos = self.starts[t]
            outputs[t] = self.heads[t](self.chain.suffix(h, ctx, x, pos, self.task_layers[t]))
        return dict(zip(self.keys, outputs)) if self.keys is not None else outputs
