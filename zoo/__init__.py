"""Lightning Zoo: techniques for adapting pretrained networks, built from parts that compose.

The parts live in ``zoo.batch``, ``zoo.losses``, ``zoo.surgery``, ``zoo.families`` and ``zoo.classifier``;
each technique is a package ``zoo/<technique>/``. Names below are imported on first use, so importing ``zoo``
(which every datamodule does, for :class:`zoo.batch.Batch`) loads no technique.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "zoo.batch",
    "Classifier": "zoo.classifier",
    "CrossEntropy": "zoo.losses",
    "LossTerm": "zoo.losses",
    "Surgery": "zoo.surgery",
    "build_backbone": "zoo.backbones",
    "load_zoo_module": "zoo.backbones",
    **dict.fromkeys(["LoRA", "KeysValues", "DynamicRank", "AdaLoRA", "E3VA"], "zoo.adapters"),
    **dict.fromkeys(["ContinualClassifier", "DER", "DERpp", "ER", "FineTune", "Joint", "KFPF", "ReplayBuffer",
                     "ExperienceReplay", "DarkReplay", "ReplayTerm"], "zoo.continual"),
    **dict.fromkeys(["AttentionDistill", "DecoupledKD", "DistillationModule", "DistillLoss", "FeatureHint", "HardCE", "HardDistill",
                     "HiddenStateDistill", "SoftTargetKL"], "zoo.distillation"),
    **dict.fromkeys(["EMoEFFN", "EMoEModule", "Moefy", "BalanceLoss", "demoefy", "moefy"], "zoo.emoe"),
    "PruneStructured": "zoo.pruning",
    **dict.fromkeys(["Anchors", "SNNetModule", "Stitch", "StitchableNet", "StitchingLayer", "StitchSampler"], "zoo.snnet"),
    **dict.fromkeys(["FeatureCache", "Freeze", "FrozenPrefix", "LayerChain", "MultiTaskSubTuned", "ProfileRunner", "ScoringRecipe", "SubTuningModule", "candidate_layers", "greedy_select"], "zoo.subtuning"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
