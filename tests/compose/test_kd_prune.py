"""Distillation + gradual magnitude pruning (configs/compose/kd_prune.yaml): the student reaches the schedule's
sparsity (zeros counted), the KD term is logged next to cross-entropy, and the teacher is never pruned."""

from __future__ import annotations

from pathlib import Path


from callbacks.pruning import MagnitudePruning
from tests.helpers import ROOT
from tests.standin import fit_config
from zoo.distillation import SoftTargetKL, pool_of

CONFIG = ROOT / "configs" / "compose" / "kd_prune.yaml"


def run_config(tmp_path: Path, monkeypatch, *extra: str):
    """``zoo fit`` of the compose config on stand-in data, 3 steps, pruned at steps 0..2 to the config's 50 %; returns the CLI."""
    schedule = "--callbacks.pruning.init_args.schedule.init_args"
    return fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.init_args.batch_size=16",
                      f"{schedule}.start=0", f"{schedule}.end=2", f"{schedule}.frequency=1", *extra)


def zeros(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def test_student_reaches_the_target_sparsity_and_the_kd_term_is_logged(tmp_path, monkeypatch):
    run = run_config(tmp_path, monkeypatch)
    module, trainer = run.model, run.trainer
    (cb,) = [c for c in trainer.callbacks if isinstance(c, MagnitudePruning)]
    assert cb.history[-1][1] == 0.5 and not cb.masks(module)  # the schedule's end, masks baked in
    assert cb.targets and all(t.startswith("backbone.blocks.") for t in cb.targets)
    assert abs(zeros(module.get_parameter(t) for t in cb.targets) - 0.5) < 1e-3  # global pruning: half of the blocks' weights are zero
    assert zeros(p for n, p in module.named_parameters() if not n.startswith("backbone.blocks.") and p.ndim >= 2) == 0  # nothing else pruned
    assert {"train/soft_target_kl", "train/cross_entropy"} <= set(trainer.logged_metrics)
    assert module.loss_term(SoftTargetKL).weight == 0.9
    (teacher,) = [t.model for t in pool_of(module).teachers.values()]
    assert zeros(p for p in teacher.parameters() if p.ndim >= 2) == 0  # the teacher lives outside the student and was not pruned
