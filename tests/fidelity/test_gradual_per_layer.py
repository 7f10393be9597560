"""Issue 16, item 20: gradual pruning prunes EVERY layer to s_t (Zhu & Gupta 2017, "To prune, or not to prune"; the
paper's tf.contrib.model_pruning keeps one threshold per weight tensor). Global pruning stays an option."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn
from torch.nn.utils import prune

from callbacks.pruning import MagnitudePruning
from callbacks.pruning_schedules import Cubic, OneShot
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo import Classifier

S_I, S_F, T0, N, DT = 0.2, 0.8, 2, 4, 2  # prune at steps 2, 4, 6, 8, 10


def s_t(t: int) -> float:
    """Zhu & Gupta eq. 1 by hand, at a pruning step t."""
    return S_F + (S_I - S_F) * (1 - (t - T0) / (N * DT)) ** 3


class Weights(Callback):
    """The weights each target holds (masked entries zero) when called, by step."""

    def __init__(self, cb: MagnitudePruning):
        self.cb, self.seen = cb, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        out = {}
        for name in self.cb.targets:
            module, pname = name.rsplit(".", 1)
            module = pl_module.get_submodule(module)
            mask = getattr(module, pname + "_mask", None)
            w = getattr(module, pname + "_orig", getattr(module, pname)).detach()
            out[name] = (w * mask if mask is not None else w).clone()
        self.seen[trainer.global_step] = out


def _tiny() -> Classifier:
    return Classifier(TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS)


def _fit(module, callbacks, max_steps):
    Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, callbacks=callbacks, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(module, Digits(batch_size=32))


def test_gradual_default_prunes_every_layer_to_s_t_like_l1_unstructured():
    seed_everything(0)
    module = _tiny()
    cb = MagnitudePruning(Cubic(final_sparsity=S_F, initial_sparsity=S_I, start=T0, end=T0 + N * DT, frequency=DT),
                          patterns=["backbone.blocks.*"], make_permanent=False)
    assert cb.global_pruning is False  # the default is Zhu & Gupta's per-layer pruning
    before, after = Weights(cb), Weights(cb)
    _fit(module, [before, cb, after], max_steps=T0 + N * DT + 1)
    steps = [T0 + k * DT for k in range(N + 1)]
    assert [h[0] for h in cb.history] == steps
    assert [h[1] for h in cb.history] == [s_t(t) for t in steps] and cb.history[-1][1] == S_F
    assert len({before.seen[0][n].numel() for n in cb.targets}) > 1  # layers of different sizes
    for t in steps:
        for name in cb.targets:
            w, pruned = before.seen[t][name], after.seen[t][name]
            n = w.numel()
            assert int((pruned == 0).sum()) == round(s_t(t) * n), (t, name)  # exactly round(s_t * n) zeros in EACH layer
            ref = nn.Linear(1, 1)  # reference: torch's l1_unstructured on that layer alone, at the same weights
            ref.weight = nn.Parameter(w.clone())
            prune.l1_unstructured(ref, "weight", amount=s_t(t))
            assert torch.equal(ref.weight_mask.bool(), pruned != 0), (t, name)
    # measured overall sparsity: the per-layer counts summed (not round(s_t * total))
    total = sum(before.seen[0][n].numel() for n in cb.targets)
    assert cb.history[-1][2] == sum(round(S_F * before.seen[0][n].numel()) for n in cb.targets) / total


def test_global_pruning_stays_an_option():
    seed_everything(0)
    module = _tiny()
    dense = copy.deepcopy(module)
    cb = MagnitudePruning(OneShot(0.6), patterns=["backbone.blocks.*"], global_pruning=True, make_permanent=False)
    _fit(module, [cb], max_steps=1)
    weights = [dense.get_parameter(n).detach() for n in cb.targets]
    scores = torch.cat([w.abs().flatten() for w in weights])  # one threshold over all layers
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[scores.topk(round(0.6 * scores.numel()), largest=False).indices] = False
    masks = cb.masks(module)
    assert torch.equal(torch.cat([masks[n].bool().flatten() for n in cb.targets]), keep)
    zeros = [int((~masks[n].bool()).sum()) for n in cb.targets]
    assert any(z != round(0.6 * w.numel()) for z, w in zip(zeros, weights))  # not every layer at s, unlike the per-layer default
