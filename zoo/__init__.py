"""Lightning Zoo: techniques for adapting pretrained networks, one LightningModule each."""

from zoo.backbones import build_backbone, load_zoo_module
from zoo.classifier import Classifier

__all__ = ["Classifier", "build_backbone", "load_zoo_module"]
