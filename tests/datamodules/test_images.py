import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules import CIFAR10, CIFAR100, MNIST, Digits, FashionMNIST, ImageFolder
from tests.standin import write_cifar, write_mnist_like
from zoo.batch import Batch


def test_digits_split_is_seeded_disjoint_and_normalised():
    a, b, c = Digits(seed=0), Digits(seed=0), Digits(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert a.train_set.indices == b.train_set.indices != c.train_set.indices
    assert not set(a.train_set.indices) & set(a.val_set.indices)
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    sample = a.train_set[0]
    assert isinstance(sample, Batch) and sample.index is None and sample.task is None and sample.raw is None
    x, y = sample.inputs, sample.targets
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10
    assert a.num_classes == 10 and a.deterministic_train_transform and not Digits(augment=True).deterministic_train_transform


def test_samples_per_class_keeps_exactly_that_many():
    dm = Digits(samples_per_class=5)
    dm.setup()
    counts = np.bincount(dm.train_set.targets, minlength=10)
    assert (counts == 5).all()


def test_with_index_and_resize():
    dm = Digits(with_index=True, image_size=16, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.task is None and batch.raw is None
    x, y, i = batch.inputs, batch.targets, batch.index
    assert x.shape == (4, 1, 16, 16) and i.shape == (4,)
    first = dm.train_set[int(i[0])]
    x0, y0, i0 = first.inputs, first.targets, first.index
    assert torch.equal(x0, x[0]) and y0 == y[0] and i0 == i[0] and y0 == dm.train_set.targets[i0]
    val = next(iter(dm.val_dataloader()))  # validation batches carry indices too
    assert torch.equal(val.index, torch.arange(4)) and torch.equal(val.inputs[1], dm.val_set[1].inputs)
    assert next(iter(dm.test_dataloader())).index is None  # the test split has none


def test_batch_require_names_with_index_when_the_datamodule_has_none():
    dm = Digits(batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.index is None
    with pytest.raises(ValueError, match=r"SomeCache needs the batch field 'index'.*with_index: true"):
        batch.require("index", by="SomeCache")
    indexed = Digits(batch_size=4, with_index=True)
    indexed.setup()
    assert torch.equal(next(iter(indexed.train_dataloader())).require("index", by="SomeCache"), next(iter(indexed.train_dataloader())).index)


def test_skip_cached_returns_placeholders_for_cached_samples_until_teardown():
    dm = Digits(with_index=True, batch_size=4)
    dm.setup()
    with pytest.raises(ValueError, match="with_index"):
        dm.test_set.skip_cached(torch.ones(3, dtype=torch.bool), torch.zeros(1, 8, 8))
    cached = torch.tensor([True, False, True])  # samples 0 and 2; indices past the mask load as usual
    dm.val_set.skip_cached(cached, torch.full((1, 8, 8), -7.0))
    batch = next(iter(dm.val_dataloader()))
    x, y, i = batch.inputs, batch.targets, batch.index
    assert torch.equal(y, torch.tensor(dm.val_set.targets[:4])) and torch.equal(i, torch.arange(4))
    assert (x[0] == -7).all() and (x[2] == -7).all()
    dm.teardown("fit")
    assert dm.val_set.cached is None
    for k in (1, 3, 0):
        assert torch.equal(x[k] if k != 0 else dm.val_set[0].inputs, dm.val_set.transform(dm.val_set.dataset[dm.val_set.indices[k]].inputs))


def test_fashion_mnist_finds_debian_files(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_mnist_like(tmp_path / "gen", "FashionMNIST", n_train=20, n_test=10)
    debian.mkdir()
    import gzip

    for f in (tmp_path / "gen" / "FashionMNIST" / "raw").iterdir():
        (debian / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    monkeypatch.setattr(FashionMNIST, "debian_dir", debian)
    dm = FashionMNIST(data_dir=str(tmp_path / "data"), download=False, val_fraction=0.25)
    dm.setup()
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5 and len(dm.test_set) == 10
    assert dm.train_set[0].inputs.shape == (1, 28, 28)


def test_a_subclass_with_its_own_mean_and_std_reads_the_same_data(tmp_path):
    """The torchvision dataset is named by a class attribute, not by the (sub)class's own name."""
    write_mnist_like(tmp_path, "FashionMNIST", n_train=20, n_test=10)

    class MyFMNIST(FashionMNIST):
        mean = (0.5,)
        std = (0.25,)

    mine, base = MyFMNIST(data_dir=str(tmp_path), download=False), FashionMNIST(data_dir=str(tmp_path), download=False)
    mine.setup()
    base.setup()
    assert mine.train_set.indices == base.train_set.indices and len(mine.test_set) == 10
    a, b = mine.train_set[3].inputs, base.train_set[3].inputs
    assert not torch.allclose(a, b)  # normalised with the subclass's mean/std ...
    torch.testing.assert_close(a * 0.25 + 0.5, b * FashionMNIST.std[0] + FashionMNIST.mean[0])  # ... of the same pixels
    assert MyFMNIST.torchvision_dataset == "FashionMNIST" and MNIST.torchvision_dataset == "MNIST"


def test_eval_view_is_a_deterministic_indexed_copy_and_leaves_the_split_alone():
    dm = Digits(augment=True, batch_size=8)
    with pytest.raises(ValueError, match="call setup"):
        dm.eval_view("train")
    dm.setup()
    train_transform = dm.train_set.transform
    view = dm.eval_view("train")
    assert view is not dm.train_set and view.indices == dm.train_set.indices and len(view) == len(dm.train_set)
    assert dm.train_set.transform is train_transform and not dm.train_set.with_index and dm.train_set.augment_seed is not None
    eval_transform = dm.eval_transform()
    for i in (0, 5):
        s = view[i]
        assert s.index == i and s.targets == dm.train_set.targets[i]
        assert torch.equal(s.inputs, eval_transform(dm.train_set.dataset[dm.train_set.indices[i]].inputs))  # no augmentation
        assert torch.equal(view.__getitems__(_epoch_batch([i], epoch=3))[0].inputs, s.inputs)  # the same in every epoch
    assert any(not torch.equal(dm.train_set[i].inputs, view[i].inputs) for i in range(8))  # the split still augments
    batch = next(iter(DataLoader(view, batch_size=8, collate_fn=dm.collate_fn)))
    assert torch.equal(batch.index, torch.arange(8)) and batch.inputs.shape == (8, 1, 8, 8)
    assert dm.eval_view("val").indices == dm.val_set.indices and dm.eval_view("test")[0].index == 0
    with pytest.raises(ValueError, match="split='dev'"):
        dm.eval_view("dev")


def _epoch_batch(indices, epoch):
    from datamodules.resumable import EpochBatch

    b = EpochBatch(indices)
    b.epoch = epoch
    return b


def test_mnist_reads_idx_files(tmp_path):
    write_mnist_like(tmp_path, "MNIST", n_train=30, n_test=12)
    dm = MNIST(data_dir=str(tmp_path), download=False, val_fraction=0.0)
    dm.setup()
    raw = np.frombuffer((tmp_path / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    x = dm.train_set[4].inputs * MNIST.std[0] + MNIST.mean[0]
    np.testing.assert_allclose(x[0].numpy() * 255, raw[4], atol=1e-3)


def test_missing_data_names_paths_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "debian_dir", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        FashionMNIST(data_dir=str(tmp_path), download=False).setup()
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10(data_dir=str(tmp_path), download=False).setup()
    with pytest.raises(FileNotFoundError, match="train"):
        ImageFolder(data_dir=str(tmp_path / "nope"))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has 0 class folder\(s\).*it is empty"):
        ImageFolder(data_dir=str(tmp_path / "flat"))
    (tmp_path / "flat" / "train" / "a.png").touch()  # images straight in train/, no class folders
    with pytest.raises(ValueError, match=r"has 0 class folder\(s\).*found: \['a.png'\]"):
        ImageFolder(data_dir=str(tmp_path / "flat"))


@pytest.mark.parametrize("cls, n_classes", [(CIFAR10, 10), (CIFAR100, 100)])
def test_cifar_on_disk_format(tmp_path, cls, n_classes):
    write_cifar(tmp_path, n_classes, n_per_file=20)
    dm = cls(data_dir=str(tmp_path), download=False, augment=True)
    dm.setup()
    x = dm.train_set[0].inputs
    assert x.shape == (3, 32, 32) and dm.num_classes == n_classes
    assert len(dm.test_set) == 20 and max(dm.test_set.targets) == min(19, n_classes - 1)


def test_image_folder_with_and_without_val(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageFolder(data_dir=str(tmp_path), image_size=16, samples_per_class=2)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.train_set) == 6 and len(dm.val_set) == 12 and dm.test_set is not None
    assert dm.train_set[0].inputs.shape == (3, 16, 16)
    import shutil

    shutil.rmtree(tmp_path / "val")
    dm = ImageFolder(data_dir=str(tmp_path), image_size=16, val_fraction=0.25)
    dm.setup()
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3 and dm.test_set is dm.val_set


@pytest.mark.parametrize("kwargs, match", [({"val_fraction": 1.0}, "val_fraction=1.0"), ({"samples_per_class": 0}, "samples_per_class=0"), ({"batch_size": 0}, "batch_size=0")])
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Digits(**kwargs)


def test_shuffle_depends_only_on_seed_and_epoch():
    """A resumed run (fresh loader, same epoch) must see the batches the interrupted run would have seen."""
    dm = Digits(batch_size=16)
    dm.setup()
    first, again = dm.train_dataloader(), Digits(batch_size=16)
    again.setup()
    again = again.train_dataloader()
    first, again = first.batch_sampler.sampler, again.batch_sampler.sampler
    first.set_epoch(3)
    again.set_epoch(3)
    assert list(first) == list(again)
    again.set_epoch(4)
    assert list(first) != list(again) and sorted(again) == list(range(len(dm.train_set)))
