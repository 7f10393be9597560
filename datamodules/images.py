"""Image-classification datamodules: Digits (bundled), MNIST, FashionMNIST, CIFAR-10/100, ImageFolder."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path
import numpy as np
import torch
from torchvision.transforms import v2 as T

from datamodules.base import ClassificationDataModule, per_class_subset, split_indices
from datamodules.tensor import TensorPairs

__all__ = ["CIFAR10", "CIFAR100", "MNIST", "Digits", "FashionMNIST", "ImageFolder", "TensorPairs"]


def missing_data(name: str, tried: list[Path | str], how: str) -> FileNotFoundError:
    paths = "\n  ".join(str(p) for p in tried)
    return FileNotFoundError(f"{name} not found. Paths tried:\n  {paths}\nTo get it: {how}")


class Digits(ClassificationDataModule):
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes): needs no download.

    A fixed 20 % of the images (seed 0) is the test split; ``val_fraction`` of the rest is val.
    """

    num_classes = 10
    in_chans = 1
    native_size = 8
    mean = (0.3,)
    std = (0.4,)

    def load_split(self, split: str):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(np.clip(digits.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
        targets = torch.from_numpy(digits.target)
        train_idx, test_idx = split_indices(targets.tolist(), 0.2, seed=0)
        idx = torch.tensor(train_idx if split == "train" else test_idx)
        return TensorPairs(images[idx], targets[idx]), targets[idx].tolist()


class MNIST(ClassificationDataModule):
    """MNIST from torchvision: ``<data_dir>/MNIST/raw`` (downloaded when absent and ``download``).

    ``torchvision_dataset`` names the torchvision class (and the data folder), so a subclass (e.g. with
    another ``mean``/``std``) reads the same data.
    """

    num_classes = 10
    in_chans = 1
    native_size = 28
    mean = (0.1307,)
    std = (0.3081,)
    torchvision_dataset = "MNIST"
    how_to_get = "set download: true (needs internet), or put the four IDX files in <data_dir>/{name}/raw/"

    def find_local(self) -> list[Path]:
        """Other places to look for the raw files before downloading (none for MNIST)."""
        return []

    def load_split(self, split: str):
        from torchvision import datasets

        cls = getattr(datasets, self.torchvision_dataset)
        raw = Path(self.data_dir) / cls.__name__ / "raw"
        files = [raw / Path(url).stem for url, _ in cls.resources]
        if not all(f.exists() for f in files):
            for source in self.find_local():
                if all((source / f"{f.name}.gz").exists() for f in files):
                    raw.mkdir(parents=True, exist_ok=True)
                    for f in files:
                        with gzip.open(source / f"{f.name}.gz", "rb") as src, open(f, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    break
        try:
            ds = cls(self.data_dir, train=split == "train", download=self.download and not all(f.exists() for f in files))
        except (RuntimeError, OSError) as err:
            raise missing_data(cls.__name__, files + [f"{s}/*.gz" for s in self.find_local()], self.how_to_get.format(name=cls.__name__) + f" ({err})") from err
        return TensorPairs(ds.data.unsqueeze(1), ds.targets), ds.targets.tolist()


class FashionMNIST(MNIST):
    """Fashion-MNIST from torchvision; also finds Debian's ``dataset-fashion-mnist`` files."""

    mean = (0.2860,)
    std = (0.3530,)
    torchvision_dataset = "FashionMNIST"
    debian_dir = Path("/usr/share/datasets/fashion-mnist")
    how_to_get = "apt-get install dataset-fashion-mnist, or set download: true (needs internet), or put the four IDX files in <data_dir>/{name}/raw/"

    def find_local(self) -> list[Path]:
        return [self.debian_dir]


class CIFAR10(ClassificationDataModule):
    """CIFAR-10 in its on-disk python format (``<data_dir>/cifar-10-batches-py``), downloaded when absent
    (with the torchvision class ``torchvision_dataset``, so subclasses download the same data)."""

    num_classes = 10
    in_chans = 3
    native_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    flip = True
    torchvision_dataset = "CIFAR10"
    folder, train_files, test_files, label_key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"

    def load_split(self, split: str):
        root = Path(self.data_dir) / self.folder
        names = self.train_files if split == "train" else self.test_files
        files = [root / n for n in names]
        if not all(f.exists() for f in files) and self.download:
            from torchvision import datasets

            try:
                getattr(datasets, self.torchvision_dataset)(self.data_dir, download=True)
            except (RuntimeError, OSError) as err:
                raise missing_data(self.torchvision_dataset, files, f"set download: true with internet access ({err})") from err
        if not all(f.exists() for f in files):
            raise missing_data(self.torchvision_dataset, files, "set download: true (needs internet)")
        images, targets = [], []
        for f in files:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets += list(batch[self.label_key])
        return TensorPairs(torch.from_numpy(np.concatenate(images)), targets), targets


class CIFAR100(CIFAR10):
    """CIFAR-100 (fine labels) in its on-disk python format (``<data_dir>/cifar-100-python``)."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    torchvision_dataset = "CIFAR100"
    folder, train_files, test_files, label_key = "cifar-100-python", ["train"], ["test"], "fine_labels"


class ImageFolder(ClassificationDataModule):
    """Images in ``<data_dir>/train/<class>/*`` (and optionally ``val/`` and ``test/`` alike).

    Without a ``val`` folder, ``val_fraction`` of ``train`` is held out; without ``test``, val is
    used for testing. Images are resized and center-cropped to ``image_size``, one by one (per-sample
    torchvision transforms: files on disk do not take the fast path, ``fast`` and ``transform_on_device`` change
    nothing here).
    """

    in_chans = 3
    native_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    flip = True

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        samples_per_class: int | None = None,
        image_size: int | None = None,
        augment: bool = False,
        download: bool = True,
        with_index: bool = False,
        fast: bool = True,
        transform_on_device: bool = False,
    ):
        super().__init__(
            data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction, seed=seed,
            samples_per_class=samples_per_class, image_size=image_size, augment=augment, download=download, with_index=with_index,
            fast=fast, transform_on_device=transform_on_device,
        )
        train = Path(data_dir) / "train"
        if not train.is_dir():
            raise missing_data("ImageFolder data", [train], "arrange images as <data_dir>/train/<class_name>/<image>")
        self.classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if len(self.classes) < 2:
            found = sorted(p.name for p in train.iterdir())[:5]
            raise ValueError(f"ImageFolder: {train} has {len(self.classes)} class folder(s) {self.classes}; expected one folder "
                             f"per class, <data_dir>/train/<class_name>/<image>, at least 2" + (f" (found: {found})" if found else " (it is empty)"))
        self.num_classes = len(self.classes)

    def eval_transform(self):
        return T.Compose([T.ToImage(), T.Resize(self.image_size, antialias=True), T.CenterCrop(self.image_size), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])

    def train_transform(self):
        if not self.augment:
            return self.eval_transform()
        return T.Compose([T.ToImage(), T.RandomResizedCrop(self.image_size, antialias=True), T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])

    def _folder(self, name: str):
        from torchvision.datasets import ImageFolder as TVImageFolder

        ds = TVImageFolder(str(Path(self.data_dir) / name))
        if ds.classes != self.classes:
            raise ValueError(f"{Path(self.data_dir) / name} has classes {ds.classes}, train has {self.classes}")
        return ds, ds.targets

    def load_split(self, split: str):
        return self._folder(split if (Path(self.data_dir) / split).is_dir() else "train")

    def setup(self, stage: str | None = None) -> None:
        root = Path(self.data_dir)
        if self.train_set is not None:
            return
        if not (root / "val").is_dir():
            super().setup(stage)
            if not (root / "test").is_dir():
                self.test_set = self.val_set
            return
        train, t_targets = self._folder("train")
        val, v_targets = self._folder("val")
        train_idx = list(range(len(train)))
        if self.hparams.samples_per_class:
            train_idx = per_class_subset(train_idx, t_targets, self.hparams.samples_per_class, self.hparams.seed)
        self.train_set = self.train_subset(train, train_idx, t_targets)
        self.val_set = self.eval_subset(val, range(len(val)), v_targets, self.with_index)
        test, s_targets = self._folder("test") if (root / "test").is_dir() else (val, v_targets)
        self.test_set = self.eval_subset(test, range(len(test)), s_targets)
