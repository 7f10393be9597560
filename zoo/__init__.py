"""Lightning Zoo: techniques for adapting pretrained networks, one LightningModule each."""

from zoo.backbones import build_backbone, load_zoo_module
from zoo.classifier import Classifier
from zoo.continual import DER, ER, KFPF, ContinualClassifier, DERpp, FineTune, Joint
from zoo.distillation import AttentionDistill, DecoupledKD, DistillationModule, DistillLoss, FeatureHint, HardCE, HiddenStateDistill, SoftTargetKL
from zoo.emoe import EMoEFFN, demoefy, moefy
from zoo.emoe_module import EMoEModule
from zoo.replay_buffer import ReplayBuffer
from zoo.snnet import StitchableNet, StitchingLayer, StitchSampler
from zoo.snnet_module import SNNetModule
from zoo.subtuning import MultiTaskSubTuned, SubTuningModule, candidate_layers, greedy_select

__all__ = [
    "DER", "ER", "KFPF", "AttentionDistill", "Classifier", "ContinualClassifier", "DERpp", "DecoupledKD", "DistillLoss",
    "DistillationModule", "EMoEFFN", "EMoEModule", "FeatureHint", "FineTune", "HardCE", "HiddenStateDistill", "Joint", "MultiTaskSubTuned", "ReplayBuffer",
    "SNNetModule", "SoftTargetKL", "StitchSampler", "StitchableNet", "StitchingLayer", "SubTuningModule", "build_backbone",
    "candidate_layers", "demoefy", "greedy_select", "load_zoo_module", "moefy",
]
