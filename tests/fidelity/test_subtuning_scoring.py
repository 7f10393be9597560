"""Issue 16, item 11: SubTuning scores each candidate with a configurable recipe, the official one by default
(talswisa/SubTuning: every candidate trained with the task's recipe, 10 epochs of AdamW lr 1e-4 / wd 5e-5 with a
per-epoch cosine schedule, batch 256, mean accuracy over 5 cross-validation folds; ``fast``: ours, 100 steps)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import cli
from callbacks.subtuning_profile import SubTuningProfile
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import build_backbone
from zoo.subtuning.profile import ProfileRunner
from zoo.subtuning.recipe import ScoringRecipe

ROOT = Path(__file__).resolve().parents[2]
N = 10


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)


def _runner(recipe, **overrides) -> ProfileRunner:
    torch.manual_seed(0)
    return ProfileRunner(build_backbone(TINY_VIT, **TINY_VIT_KWARGS), 10, _data(0), _data(1), recipe=recipe, **overrides)


def test_presets_defaults_and_yaml():
    official = ScoringRecipe.official()
    assert (official.epochs, official.steps, official.batch_size, official.lr, official.weight_decay, official.optimizer, official.schedule, official.folds) \
        == (10, None, 256, 1e-4, 5e-5, "adamw", "cosine", 5)  # scripts/greedy_subtuning_vit_cifar100.sh + conf/
    fast = ScoringRecipe.fast()
    assert (fast.epochs, fast.steps, fast.batch_size, fast.lr, fast.weight_decay, fast.schedule, fast.folds) == (None, 100, 32, 1e-3, 0.0, "constant", 1)
    assert ScoringRecipe() == official and SubTuningProfile().recipe == official and _runner("official").recipe == official
    assert SubTuningProfile(recipe="fast", steps=60).recipe == ScoringRecipe(epochs=None, steps=60, batch_size=32, lr=1e-3, weight_decay=0.0, schedule="constant", folds=1)
    with pytest.raises(ValueError, match="schedule"):
        ScoringRecipe(schedule="linear")
    # LightningCLI sets it from YAML: a preset name, or a mapping of fields (the others: official values)
    config = str(ROOT / "configs" / "subtuning" / "profile.yaml")
    fast60 = ScoringRecipe(steps=60, batch_size=32, lr=1e-3, weight_decay=0.0, schedule="constant", folds=1)
    for args, expected in [([], fast60), (["recipe=official"], official), (["recipe=official", "recipe.folds=2"], ScoringRecipe(folds=2))]:
        args = [f"--callbacks.profile.init_args.{a}" for a in args]
        run = cli.main(["--config", config, "--trainer.logger=false", "--model.init_args.pretrained=false", *args], run=False)
        (cb,) = [c for c in run.trainer.callbacks if isinstance(c, SubTuningProfile)]
        assert cb.recipe == expected
        assert cb.k == 2  # the config's cap; the official search has none (k: null)


def test_folds_score_is_the_mean_of_fold_accuracies_by_hand():
    """lr 0: every fold trains to the same, deterministic model, whose accuracy on each held-out fold is computed by
    hand from a plain forward pass; the score is the unweighted mean over the folds, each sample held out once."""
    runner = _runner(ScoringRecipe(epochs=1, batch_size=4, lr=0.0, folds=3))
    x, y = runner.data["train"]
    fits, evals = [], []
    fit, accuracy = runner.fit, runner.accuracy
    runner.fit = lambda layers, train_idx=None: (fits.append(train_idx), fit(layers, train_idx))[1]
    runner.accuracy = lambda *a, **k: (evals.append(a[4] if len(a) > 4 else k["idx"]), accuracy(*a, **k))[1]
    score = runner.score(("blocks.1",))
    assert len(fits) == len(evals) == 3 and all(a is not None for a in fits)
    assert sorted(torch.cat(evals).tolist()) == list(range(N)) and sorted(len(f) for f in evals) == [3, 3, 4]
    for i, (train_idx, fold) in enumerate(zip(fits, evals)):  # trained on the other folds, concatenated in order
        assert torch.equal(train_idx, torch.cat([f for j, f in enumerate(evals) if j != i]))
    net, head, _ = fit(("blocks.1",))
    with torch.no_grad():
        pred = head(net(x)).argmax(-1)
    by_hand = [(pred[f] == y[f]).float().mean().item() for f in evals]
    assert score == pytest.approx(sum(by_hand) / 3, abs=1e-12)
    pooled = (pred == y).float().mean().item()  # folds of 4, 3 and 3 samples: the official unweighted mean differs
    assert score != pytest.approx(pooled)


class Steps:
    """Every optimizer step: (optimizer, lr of its first param group)."""

    def __enter__(self):
        self.seen = []
        self.handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: self.seen.append((opt, opt.param_groups[0]["lr"])))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _cosine(lr, t, horizon):
    return lr * (1 + math.cos(math.pi * t / horizon)) / 2


@pytest.mark.parametrize("case", ["epochs_cosine", "folds", "steps_cosine_sgd", "epochs_step", "fast"])
def test_the_optimizer_sees_the_recipes_budget_and_schedule(case):
    lr = 0.01
    recipe, expected_lrs, fits = {
        # 3 epochs of ceil(10 / 4) = 3 batches, cosine over epochs (T_max=3), stepped after each epoch
        "epochs_cosine": (ScoringRecipe(epochs=3, batch_size=4, lr=lr, folds=1), [_cosine(lr, e, 3) for e in range(3) for _ in range(3)], 1),
        # 2 folds of 5 training samples: 2 batches per epoch, 2 epochs, one run per fold
        "folds": (ScoringRecipe(epochs=2, batch_size=4, lr=lr, folds=2), [_cosine(lr, e, 2) for e in range(2) for _ in range(2)] * 2, 2),
        # a step budget: cosine over steps (T_max=5), stepped after each step; SGD with momentum 0.9
        "steps_cosine_sgd": (ScoringRecipe(steps=5, batch_size=4, lr=lr, optimizer="sgd", folds=1), [_cosine(lr, s, 5) for s in range(5)], 1),
        # official schedule "step": StepLR(step_size=6 // 3 + 1 = 3, gamma=0.1) over 6 epochs of 1 batch
        "epochs_step": (ScoringRecipe(epochs=6, batch_size=16, lr=lr, schedule="step", folds=1), [lr] * 3 + [lr * 0.1] * 3, 1),
        # ours: 100 AdamW steps at a constant lr 1e-3
        "fast": (ScoringRecipe.fast(), [1e-3] * 100, 1),
    }[case]
    runner = _runner(recipe)
    with Steps() as steps:
        runner.score(("blocks.1",))
    assert [s[1] for s in steps.seen] == pytest.approx(expected_lrs, rel=1e-9, abs=1e-15)
    optimizers = list(dict.fromkeys(s[0] for s in steps.seen))
    assert len(optimizers) == fits
    expected_type = torch.optim.SGD if recipe.optimizer == "sgd" else torch.optim.AdamW
    for opt in optimizers:
        assert type(opt) is expected_type and opt.param_groups[0]["weight_decay"] == recipe.weight_decay
        assert opt.param_groups[0].get("momentum", 0.9) == 0.9
    if recipe.steps is None:  # each epoch is one shuffle of the run's training samples, cut into batches
        n = N - N // recipe.folds if recipe.folds > 1 else N
        units = list(recipe.units(n, torch.Generator().manual_seed(0)))
        assert len(units) == recipe.epochs and all(sorted(torch.cat(u).tolist()) == list(range(n)) for u in units)
        assert all(len(b) == min(recipe.batch_size, n - i * recipe.batch_size) for u in units for i, b in enumerate(u))
