"""Resumable training loaders, per-sample augmentation seeds, evaluation splits in a fixed seeded order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, DistributedSampler

from datamodules import CIFAR10, MNIST, ContinualDataModule, Digits, FashionMNIST, JaneAusten, TextClassification
from datamodules.resumable import EpochBatchSampler, ResumableLoader
from tests.standin import write_all
from zoo.batch import FIELDS, collate


def batches(loader, n: int | None = None) -> list:
    return list(loader) if n is None else [b for _, b in zip(range(n), loader)]  # takes exactly n batches


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in FIELDS:
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None and v is None) or torch.equal(u, v), field


@pytest.mark.parametrize("workers", [0, 2])
def test_state_after_k_batches_resumes_the_rest_of_the_epoch(workers: int):
    dm = Digits(batch_size=32, augment=True, num_workers=workers)
    dm.setup()
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(2)
    full = batches(loader)
    loader.batch_sampler.sampler.set_epoch(2)
    head = batches(loader, 3)
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (2, 3) and len(state["rng"]) == 1
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    fresh.batch_sampler.sampler.set_epoch(2)  # as Lightning does before the epoch
    rest = batches(fresh)
    assert_same(head + rest, full)  # augmented batches too: seeded per (seed, epoch, sample)
    assert fresh.state_dict()["batches"] == len(full)
    fresh.batch_sampler.sampler.set_epoch(3)  # the next epoch starts at its beginning
    assert len(batches(fresh)) == len(full)


def test_loaded_state_of_a_finished_epoch_starts_the_next_one_whole():
    dm = Digits(batch_size=256)
    dm.setup()
    loader = dm.train_dataloader()
    n = len(batches(loader))
    fresh = dm.train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    fresh.batch_sampler.sampler.set_epoch(1)
    assert len(batches(fresh)) == n


@pytest.mark.parametrize("fast", [True, False])
def test_skipped_batches_load_no_data(fast: bool):
    dm = Digits(batch_size=16, fast=fast)
    dm.setup()
    loaded = []
    if fast:  # the whole batch is gathered at once
        original = dm.train_set.gather_items
        dm.train_set.gather_items = lambda p, epoch=None: loaded.extend(p.tolist()) or original(p, epoch)
    else:
        original = dm.train_set.item
        dm.train_set.item = lambda i, epoch=None: loaded.append(i) or original(i, epoch)
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches": 5, "rng": None})
    first = next(iter(loader))
    assert len(loaded) == 16 and first.inputs.shape[0] == 16


def test_augmentation_depends_on_seed_epoch_and_sample_only():
    dm = Digits(augment=True)
    dm.setup()
    ds = dm.train_set
    torch.manual_seed(1)
    a = ds.__getitems__(_batch([3, 4], epoch=1))
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = ds.__getitems__(_batch([4, 3], epoch=1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a[0].inputs, b[1].inputs) and torch.equal(a[1].inputs, b[0].inputs)
    c = ds.__getitems__(_batch([3], epoch=2))
    assert not torch.equal(a[0].inputs, c[0].inputs)


def _batch(indices, epoch):
    from datamodules.resumable import EpochBatch

    b = EpochBatch(indices)
    b.epoch = epoch
    return b


def test_under_ddp_each_rank_skips_its_own_batches():
    """Lightning rebuilds the loader with a DistributedSampler inside the same batch sampler; skipping is per rank."""
    dm = Digits(batch_size=8)
    dm.setup()
    for rank in range(2):
        sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        full = [list(b) for b in EpochBatchSampler(sampler, 8)]
        loader = ResumableLoader(dm.train_set, batch_sampler=EpochBatchSampler(sampler, 8), collate_fn=collate)
        loader.load_state_dict({"epoch": 1, "batches": 4, "rng": None})
        got = [b.targets.tolist() for b in loader]
        assert got == [[dm.train_set.targets[i] for i in b] for b in full[4:]]


def test_lightning_checkpoints_the_batches_taken_by_the_training_step(tmp_path):
    """Lightning does not prefetch a sized loader, so at a checkpoint the state counts the steps taken."""
    from lightning.pytorch import Callback, Trainer

    from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
    from zoo import Classifier

    seen = []

    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx + 1, trainer.train_dataloader.state_dict()["batches"]))

    dm = Digits(batch_size=64, num_workers=2)
    trainer = Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Check()])
    trainer.fit(Classifier(TINY_VIT, model_kwargs=TINY_VIT_KWARGS), dm)
    assert seen == [(k, k) for k in range(1, 5)]


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return write_all(tmp_path_factory.mktemp("standin"))


def _text(standin: Path) -> TextClassification:
    sorted_dir = standin / "sorted_text"
    sorted_dir.mkdir(exist_ok=True)
    for name in ("train.csv", "val.csv", "test.csv"):  # rows sorted by label, as JaneAusten writes them
        lines = (standin / name).read_text().splitlines()
        (sorted_dir / name).write_text("\n".join([lines[0], *sorted(lines[1:], key=lambda r: r.rsplit(",", 1)[1])]) + "\n")
    return TextClassification(data_dir=str(sorted_dir), val_file="val.csv", test_file="test.csv", batch_size=12)


def _austen(standin: Path) -> JaneAusten:
    if not Path("/usr/lib/R/site-library/janeaustenr").is_dir():
        pytest.skip("r-cran-janeaustenr is not installed (apt-get install r-cran-janeaustenr)")
    pytest.importorskip("rdata")
    return JaneAusten(data_dir=str(standin / "austen"), batch_size=32)


DATAMODULES = {
    "digits": lambda s: Digits(batch_size=16),
    "fashion_mnist": lambda s: FashionMNIST(data_dir=str(s), batch_size=12, download=False),
    "mnist": lambda s: MNIST(data_dir=str(s), batch_size=12, download=False),
    "cifar10": lambda s: CIFAR10(data_dir=str(s), batch_size=12, download=False),
    "text": _text,
    "jane_austen": _austen,
    "continual": lambda s: ContinualDataModule(Digits(batch_size=32), classes_per_task=2),
}


@pytest.mark.parametrize("name", list(DATAMODULES))
def test_first_evaluation_batch_holds_several_classes_in_a_fixed_order(name: str, standin: Path):
    dm = DATAMODULES[name](standin)
    dm.setup("fit")
    loaders = [dm.val_dataloader, dm.test_dataloader]
    if isinstance(dm, ContinualDataModule):  # the stream's loaders over the first two tasks
        loaders = [lambda split=split: dm._loader(ConcatDataset(dm._tasks[split][:2]), shuffle=False) for split in ("val", "test")]
    for loader in loaders:
        first = next(iter(loader()))
        labels = first.targets.tolist()
        assert len(set(labels)) >= 3, f"{name}: a first evaluation batch holds only classes {sorted(set(labels))}"
        assert torch.equal(next(iter(loader())).targets, first.targets)  # the same order every time
