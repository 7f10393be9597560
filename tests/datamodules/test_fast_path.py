"""The fast data path (issue 17): batches gathered from one uint8 tensor and transformed whole give the same
samples, in the same order, as the per-item path (``fast: false``), across epochs and a mid-epoch resume; its
augmentation is torchvision's crop/flip distribution, keyed per (seed, epoch, sample), and resumes exactly;
``transform_on_device`` hands the training step the same batches."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

from datamodules import ContinualDataModule, Digits
from datamodules.resumable import EpochConcat, train_loader
from datamodules.tensor import BatchTransform, Gathered, Pending, sample_keys
from zoo.batch import FIELDS
from zoo.batch import collate as per_sample_collate


def batches(loader, epoch: int, n: int | None = None) -> list:
    loader.batch_sampler.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    return list(loader) if n is None else [b for _, b in zip(range(n), loader)]


def assert_same(a: list, b: list, inputs: bool = True) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in FIELDS:
            if field == "inputs" and not inputs:
                continue
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), field
            assert u is None or (u.dtype == v.dtype and torch.equal(u, v)), field


def resumed(make_loader, epoch: int, k: int) -> list:
    """``k`` batches of ``epoch``, then the rest from a fresh loader loaded with the state at that point."""
    loader = make_loader()
    head = batches(loader, epoch, k)
    fresh = make_loader()
    fresh.load_state_dict(loader.state_dict())
    return head + batches(fresh, epoch)


def pair(**kwargs) -> tuple[Digits, Digits]:
    fast, slow = Digits(fast=True, **kwargs), Digits(fast=False, **kwargs)
    fast.setup()
    slow.setup()
    assert fast.train_set.gatherable() and not slow.train_set.gatherable()
    return fast, slow


@pytest.mark.parametrize("kwargs", [dict(with_index=True, batch_size=48), dict(samples_per_class=30, image_size=16, batch_size=32, seed=3)])
def test_plain_datamodule_fast_batches_equal_the_per_item_batches(kwargs):
    fast, slow = pair(**kwargs)
    first = batches(fast.train_dataloader(), 0)
    assert isinstance(fast.train_set.__getitems__([0, 1]), Gathered) and not isinstance(slow.train_set.__getitems__([0, 1]), Gathered)
    for epoch in (0, 1):  # across the epoch boundary: a new order, the same on both paths
        assert_same(batches(fast.train_dataloader(), epoch), batches(slow.train_dataloader(), epoch))
    assert [b.targets.tolist() for b in first] != [b.targets.tolist() for b in batches(fast.train_dataloader(), 1)]
    assert_same(resumed(fast.train_dataloader, 1, 3), batches(slow.train_dataloader(), 1))  # mid-epoch resume
    for split in ("val", "test"):
        assert_same(list(getattr(fast, f"{split}_dataloader")()), list(getattr(slow, f"{split}_dataloader")()))
    view = fast.eval_view("train")
    assert_same(list(DataLoader(view, batch_size=50, collate_fn=fast.collate_fn)),
                list(DataLoader(slow.eval_view("train"), batch_size=50, collate_fn=slow.collate_fn)))
    # any other collate still reads a gathered batch sample by sample
    assert_same(list(DataLoader(view, batch_size=50, collate_fn=per_sample_collate)), list(DataLoader(view, batch_size=50, collate_fn=fast.collate_fn)))


def test_skip_cached_gives_the_same_batches_on_both_paths():
    fast, slow = pair(with_index=True, batch_size=16)
    cached = torch.zeros(40, dtype=torch.bool)
    cached[::3] = True
    for dm in (fast, slow):
        dm.train_set.skip_cached(cached, torch.full((1, 8, 8), -7.0))
    a, b = batches(fast.train_dataloader(), 2), batches(slow.train_dataloader(), 2)
    assert_same(a, b)
    assert any((x.inputs == -7).all(dim=(1, 2, 3)).any() for x in a)


def streams(**kwargs) -> tuple[ContinualDataModule, ContinualDataModule]:
    out = []
    for fast in (True, False):
        dm = ContinualDataModule(Digits(fast=fast, **kwargs), classes_per_task=2, class_order_seed=5)
        dm.setup("fit")
        out.append(dm)
    return out[0], out[1]


@pytest.mark.parametrize("with_index", [True, False])
def test_continual_stream_fast_batches_equal_the_per_item_batches(with_index: bool):
    fast, slow = streams(with_index=with_index, batch_size=20)
    for dm in (fast, slow):
        assert dm.task_set("train", 0).gatherable() == dm.data.fast
    assert_same(batches(fast.train_dataloader(), 0), batches(slow.train_dataloader(), 0))
    assert_same(list(fast.val_dataloader()), list(slow.val_dataloader()))
    assert_same(list(fast.test_dataloader()), list(slow.test_dataloader()))

    def cumulative(dm):  # tasks 0..2 together, as a cumulative stream trains task 2: batches mix tasks
        return lambda: train_loader(EpochConcat([dm.task_set("train", t) for t in range(3)]), 20, seed=dm.data.hparams.seed, collate_fn=dm.collate_fn)

    for epoch in (4, 5):
        a, b = batches(cumulative(fast)(), epoch), batches(cumulative(slow)(), epoch)
        assert_same(a, b)
        assert any(len(set(x.task.tolist())) > 1 for x in a)
    assert_same(resumed(cumulative(fast), 5, 4), batches(cumulative(slow)(), 5))
    raw = batches(fast.train_dataloader(), 0)[0].raw
    assert raw.dtype == torch.uint8 and torch.equal(fast.buffer_transform(raw), slow.buffer_transform(raw))


def test_augmented_batches_are_keyed_per_sample_and_resume_exactly():
    fast, slow = pair(augment=True, with_index=True, batch_size=32)
    again = Digits(augment=True, with_index=True, batch_size=32)
    again.setup()
    full = batches(fast.train_dataloader(), 3)
    assert_same(full, batches(again.train_dataloader(), 3))  # reproducible from the seed
    assert_same(resumed(fast.train_dataloader, 3, 2), full)  # a mid-epoch resume replays the same inputs
    assert_same(full, batches(slow.train_dataloader(), 3), inputs=False)  # same samples as the per-item path
    other = batches(fast.train_dataloader(), 4)
    by_index = {int(i): x for b in full for i, x in zip(b.index, b.inputs)}
    assert sum(not torch.equal(by_index[int(i)], x) for b in other for i, x in zip(b.index, b.inputs)) > len(by_index) // 2
    one = fast.train_set.__getitems__(_epoch_batch([7, 2], 3))  # the same sample in another batch: the same draw
    assert torch.equal(one[0].inputs, by_index[7]) and torch.equal(fast.train_set.item(2, 3).inputs, by_index[2])


def _epoch_batch(indices, epoch):
    from datamodules.resumable import EpochBatch

    b = EpochBatch(indices)
    b.epoch = epoch
    return b


def torchvision_outputs(image: torch.Tensor, padding: int, flip: bool) -> list[torch.Tensor]:
    """Every output torchvision's RandomCrop(size, padding) (+ RandomHorizontalFlip) can give, by offset (and flip)."""
    h, w = image.shape[-2:]
    padded = F.pad(image, [padding])
    crops = [F.crop(padded, top, left, h, w) for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    return crops + ([F.horizontal_flip(c) for c in crops] if flip else [])


def test_crop_and_flip_follow_torchvision_distribution():
    """Each output is one of torchvision's possible crops; offsets and flips are uniform; keys are per sample."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3000, 3, 6, 6), dtype=torch.uint8, generator=gen)
    padding = 2
    t = BatchTransform(mean=[0.0] * 3, std=[1.0] * 3, size=6, native_size=6, padding=padding, flip=True)
    keys = sample_keys(seed=1, epoch=0, positions=torch.arange(len(images)))
    out = (t(images, keys=keys) * 255).round().to(torch.uint8)
    choice = []
    for img, o in zip(images[:3000], out):
        matches = [k for k, c in enumerate(torchvision_outputs(img, padding, True)) if torch.equal(c, o)]
        assert matches, "an output no RandomCrop + RandomHorizontalFlip could give"
        choice.append(matches[0])
    counts = torch.bincount(torch.tensor(choice), minlength=2 * (2 * padding + 1) ** 2).float()
    expected = len(choice) / len(counts)  # 50 equally likely (offset, flip) outcomes
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100, chi2  # 49 degrees of freedom: p < 1e-4 above 100
    assert torch.equal(t(images[5], keys=keys[5:6]), t(images, keys=keys)[5])  # one image or a batch: the same draw
    assert torch.equal(sample_keys(1, 0, torch.tensor([5, 9])), keys[[5, 9]]) and not torch.equal(sample_keys(1, 1, torch.tensor([5])), keys[5:6])
    assert len(set(keys.tolist())) == len(keys)


def test_buffer_transform_augments_a_whole_batch_from_the_global_rng():
    dm = ContinualDataModule(Digits(augment=True), classes_per_task=2)
    dm.setup("fit")
    raw = dm.data.train_set.dataset.images[:64]
    torch.manual_seed(0)
    a = dm.buffer_transform(raw)
    torch.manual_seed(0)
    assert torch.equal(a, dm.buffer_transform(raw)) and a.shape == (64, 1, 8, 8) and a.dtype == torch.float32
    assert not torch.equal(a, dm.buffer_transform(raw))
    pixels = (a * 0.4 + 0.3) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # crops of the same pixels, normalised as Digits


class Probe(LightningModule):
    """Records every training and validation batch (lr 0)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return torch.nn.functional.cross_entropy(self.layer(batch.inputs.flatten(1)), batch.targets)

    def validation_step(self, batch, batch_idx):
        self.seen.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def probe_fit(dm, **trainer_kwargs) -> list:
    probe = Probe()
    Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=2, **trainer_kwargs).fit(probe, dm)
    return probe.seen


def test_transform_on_device_gives_the_training_step_the_same_batches():
    """The transform left to on_after_batch_transfer (here on the CPU): the same batches reach the module."""
    kwargs = dict(augment=True, with_index=True, batch_size=64)
    deferred = Digits(transform_on_device=True, **kwargs)
    assert is_overridden("on_after_batch_transfer", deferred) and not is_overridden("on_after_batch_transfer", Digits())
    assert_same(probe_fit(deferred, max_epochs=2), probe_fit(Digits(**kwargs), max_epochs=2))
    batch = next(iter(deferred.train_dataloader()))  # outside the Trainer: untransformed until transform_batch
    assert isinstance(batch.inputs, Pending) and batch.inputs.images.dtype == torch.uint8
    plain = Digits(**kwargs)
    plain.setup()
    assert_same([deferred.transform_batch(batch)], [next(iter(plain.train_dataloader()))])
    assert not isinstance(next(iter(DataLoader(deferred.eval_view("train"), batch_size=8, collate_fn=deferred.collate_fn))).inputs, Pending)
    stream = lambda **kw: ContinualDataModule(Digits(batch_size=32, augment=True, **kw), classes_per_task=5, cumulative=True)  # noqa: E731
    assert_same(probe_fit(stream(transform_on_device=True), max_epochs=2, reload_dataloaders_every_n_epochs=1),
                probe_fit(stream(), max_epochs=2, reload_dataloaders_every_n_epochs=1))


def test_direct_reading_gives_the_batches_of_dataloaders_own_iterator():
    """Loaders without workers read their batches directly (no DataLoader iterator): the same batches, in order."""
    dm = Digits(batch_size=32, augment=True, with_index=True)
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    train.batch_sampler.sampler.set_epoch(1)
    own = list(DataLoader.__iter__(train))  # the DataLoader machinery, as before
    assert_same(batches(train, 1), own)
    assert_same(list(val), list(DataLoader.__iter__(val)))


def test_eval_batch_size_reads_the_same_samples_in_larger_batches():
    small, large = Digits(batch_size=16), Digits(batch_size=16, eval_batch_size=100)
    small.setup(), large.setup()
    for split in ("val_dataloader", "test_dataloader"):
        a, b = list(getattr(small, split)()), list(getattr(large, split)())
        assert {len(x) for x in b[:-1]} == {100} and all(len(x) == 16 for x in a[:-1])
        for field in ("inputs", "targets"):
            assert torch.equal(torch.cat([getattr(x, field) for x in a]), torch.cat([getattr(x, field) for x in b]))
    assert len(list(large.train_dataloader())[0]) == 16  # training batches keep batch_size
    with pytest.raises(ValueError, match="eval_batch_size=0"):
        Digits(eval_batch_size=0)


def test_deterministic_splits_keep_their_transformed_inputs_with_the_same_batches():
    """``cache_mb``: evaluation splits and an unaugmented training split transform their inputs once and then gather
    float rows -- the same batches as transforming every batch (``cache_mb: 0``), resized too; an augmented training
    split, a deferred transform or a split over the budget transform every batch."""
    kw = dict(samples_per_class=30, image_size=16, batch_size=32, seed=3)
    kept, fresh = Digits(**kw), Digits(cache_mb=0, **kw)
    kept.setup()
    fresh.setup()
    for split in ("train", "val", "test"):
        make = getattr(kept, f"{split}_dataloader")
        assert_same(list(make()), list(getattr(fresh, f"{split}_dataloader")()))
        assert kept.split(split).transformed() is not None and fresh.split(split).transformed() is None
    assert_same(resumed(kept.train_dataloader, 1, 3), batches(fresh.train_dataloader(), 1))
    rows = kept.test_set.rows()
    inputs, targets = kept.test_set.transformed()
    assert torch.equal(inputs, kept.test_set.transform(kept.test_set.dataset.images[rows]))
    assert torch.equal(targets, kept.test_set.dataset.targets_tensor[rows])
    augmented, deferred = Digits(augment=True, **kw), Digits(transform_on_device=True, **kw)
    augmented.setup()
    deferred.setup()
    assert augmented.train_set.transformed() is None and augmented.val_set.transformed() is not None
    assert deferred.val_set.transformed() is None
    assert kept.eval_view("train").transformed() is None  # a view is read once: nothing kept
    small = Digits(**kw)
    small.setup()
    small.test_set.cache_bytes = 100  # under one sample's floats
    assert small.test_set.transformed() is None
    with pytest.raises(ValueError, match="cache_mb=-1"):
        Digits(cache_mb=-1)


def test_evaluation_batches_are_views_of_the_kept_inputs_and_an_in_place_change_remakes_them():
    """Batches of consecutive positions (evaluation in order) are views of the kept inputs, not copies; a step that
    changes its batch in place does not corrupt the next pass (the kept inputs are made again); the kept inputs made
    inside an evaluation loop (inference mode) are plain tensors that a training step can use."""
    kw = dict(samples_per_class=30, image_size=16, batch_size=32, eval_batch_size=50, seed=3)
    kept, fresh = Digits(**kw), Digits(cache_mb=0, **kw)
    kept.setup()
    fresh.setup()
    with torch.inference_mode():
        first = list(kept.test_dataloader())
    inputs, _ = kept.test_set.transformed()
    assert not inputs.is_inference() and first[1].inputs.data_ptr() == inputs[50].data_ptr()  # a view, no copy
    expected = list(fresh.test_dataloader())
    assert_same(first, expected)
    first[0].inputs.mul_(0)  # a step changing its inputs in place
    assert_same(list(kept.test_dataloader()), expected)
    assert kept.test_set.transformed()[0] is not inputs
    shuffled = next(iter(kept.train_dataloader()))  # shuffled positions: gathered copies
    assert shuffled.inputs.data_ptr() != kept.train_set.transformed()[0].data_ptr()
