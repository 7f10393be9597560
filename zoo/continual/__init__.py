"""Continual learning on a task stream: fine-tuning, joint training, ER, DER/DER++, FPF and k-FPF.

Every method is a :class:`ContinualClassifier` (a :class:`zoo.Classifier` preset) trained on a
:class:`~datamodules.continual.ContinualDataModule`; one ``zoo fit`` runs the whole stream.

==============  =============================================================================================
``buffer``      :class:`ReplayBuffer` (reservoir or class-balanced; per-rank shares under DDP)
``replay``      the replay loss terms :class:`ExperienceReplay` (ER) and :class:`DarkReplay` (DER, DER++)
``module``      :class:`ContinualClassifier`: task masking, buffer, task ends (accuracy matrix, drift, FPF)
``methods``     the presets :class:`FineTune`, :class:`Joint`, :class:`ER`, :class:`DER`, :class:`DERpp`, :class:`KFPF`
==============  =============================================================================================

    model:
      class_path: zoo.continual.DERpp
      init_args: {model: zoo/mlp, buffer_size: 500, alpha: 0.1, beta: 0.5}

SubTuning inside the stream: ``surgery: [{class_path: zoo.subtuning.Freeze, init_args: {...}}]`` on any of them
(``configs/compose/subtuning_er.yaml``).
"""

from zoo.continual.buffer import POLICIES, ReplayBuffer
from zoo.continual.methods import DER, ER, KFPF, DERpp, FineTune, Joint
from zoo.continual.module import ContinualClassifier, module_drift
from zoo.continual.replay import DarkReplay, ExperienceReplay, ReplayTerm

__all__ = [
    "DER", "ER", "KFPF", "POLICIES", "ContinualClassifier", "DERpp", "DarkReplay", "ExperienceReplay", "FineTune", "Joint", "ReplayBuffer",
    "ReplayTerm", "module_drift",
]
