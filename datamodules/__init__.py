"""Reusable DataModules of the zoo: every dataset yields ``zoo.batch.Batch`` samples."""

import zoo.batch  # noqa: F401  first: zoo's package imports datamodules.continual, which needs zoo.batch

from datamodules.austen import JaneAusten
from datamodules.base import ClassificationDataModule, LabeledSubset
from datamodules.continual import ContinualDataModule
from datamodules.images import CIFAR10, CIFAR100, MNIST, Digits, FashionMNIST, ImageFolder
from datamodules.text import TextClassification

__all__ = ["CIFAR10", "CIFAR100", "MNIST", "ClassificationDataModule", "ContinualDataModule", "Digits", "FashionMNIST", "ImageFolder", "JaneAusten", "LabeledSubset", "TextClassification"]
