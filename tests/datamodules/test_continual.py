"""ContinualDataModule: disjoint and complete task splits, class orders, scenarios, raw inputs, indices,
cumulative streams, the trainer settings it checks, its nested datamodule's hyperparameters, bad inputs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from datamodules import Digits
from datamodules.continual import ContinualDataModule
from zoo.batch import Batch


class Probe(LightningModule):
    """Records the fields of every training batch per epoch (lr 0: nothing to learn)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.layer = torch.nn.Linear(in_features, num_classes)
        self.seen: dict[int, list[Batch]] = {}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).append(batch)
        return torch.nn.functional.cross_entropy(self.layer(batch.inputs.flatten(1)), batch.targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)


def stream(**kwargs) -> ContinualDataModule:
    dm = ContinualDataModule(Digits(batch_size=16), **kwargs)
    dm.setup("fit")
    return dm


def test_class_incremental_splits_are_disjoint_complete_and_follow_the_order():
    dm = stream(classes_per_task=2, class_order_seed=3)
    assert sorted(dm.class_order) == list(range(10)) and dm.class_order != list(range(10))
    assert dm.num_tasks == 5 and dm.num_classes == 10
    for split, subset in (("train", dm.data.train_set), ("val", dm.data.val_set), ("test", dm.data.test_set)):
        seen: list[int] = []
        for t in range(dm.num_tasks):
            ts = dm.task_set(split, t)
            seen += ts.positions
            originals = {subset.targets[p] for p in ts.positions}
            assert originals == set(dm.class_order[2 * t:2 * t + 2])  # the task's classes, in the seeded order
            assert set(ts.targets) == {2 * t, 2 * t + 1} == set(dm.task_labels(t))  # relabelled by position in the order
        assert sorted(seen) == list(range(len(subset)))  # complete, and (no duplicates) disjoint


def test_given_order_domain_and_task_scenarios():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    dm = stream(classes_per_task=5, class_order=order, scenario="domain")
    assert dm.num_classes == 5 and dm.num_tasks == 2
    ts = dm.task_set("test", 1)
    for p, y in zip(ts.positions, ts.targets):
        assert y == order.index(dm.data.test_set.targets[p]) - 5  # position inside the task
    dm = stream(classes_per_task=2, scenario="task")
    sample = dm.task_set("train", 3)[0]
    assert isinstance(sample, Batch) and sample.index is None  # the nested Digits has no with_index
    x, y, t, raw = sample.inputs, sample.targets, sample.task, sample.raw
    assert t == 3 and y in (6, 7) and raw.dtype == torch.uint8 and raw.shape == (1, 8, 8)
    assert torch.allclose(dm.buffer_transform(raw[None])[0], x)  # the buffer re-applies the training transform
    val = dm.task_set("val", 0)[0]
    assert val.task == 0 and val.raw is None and val.inputs.shape == (1, 8, 8)  # inputs, targets, task for evaluation
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.raw.dtype == torch.uint8 and torch.equal(batch.task, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"data\.init_args\.data\.init_args\.with_index"):
        batch.require("index", by="SomeCache")


def test_index_is_the_position_in_the_nested_split_unique_across_tasks():
    dm = ContinualDataModule(data=Digits(batch_size=16, with_index=True), classes_per_task=2, class_order_seed=1)
    dm.setup("fit")
    for split in ("train", "val"):
        indices = []
        for t in range(dm.num_tasks):
            ts = dm.task_set(split, t)
            for i in (0, len(ts) - 1):
                sample, nested = ts[i], dm.data.split(split)[ts[i].index]
                assert sample.index == ts.positions[i] and torch.equal(sample.inputs, nested.inputs)
                assert sample.targets == dm.label_map[nested.targets]
            indices += [ts[i].index for i in range(len(ts))]
        assert sorted(indices) == list(range(len(dm.data.split(split))))  # every sample once: unique across tasks
    assert dm.task_set("test", 0)[0].index is None  # as in the nested datamodule: the test split has none
    batch = next(iter(dm.train_dataloader()))
    assert batch.index.shape == (16,) and torch.equal(batch.require("index", by="test"), batch.index)
    assert all(dm.data.train_set.targets[int(p)] in dm.task_classes(0) for p in batch.index)


@pytest.mark.parametrize("cumulative", [False, True])
def test_a_stream_trains_task_by_task_or_cumulatively(cumulative: bool):
    dm = ContinualDataModule(data=Digits(batch_size=256, with_index=True), classes_per_task=2, cumulative=cumulative)
    probe = Probe()
    quiet_trainer(max_epochs=5, reload_dataloaders_every_n_epochs=1).fit(probe, dm)
    for epoch, batches in probe.seen.items():
        tasks = set(torch.cat([b.task for b in batches]).tolist())
        assert tasks == (set(range(epoch + 1)) if cumulative else {epoch})
    last = sorted(torch.cat([b.index for b in probe.seen[4]]).tolist())
    assert last == (list(range(len(dm.data.train_set))) if cumulative else sorted(dm.task_set("train", 4).positions))


def test_the_stream_checks_the_trainer_and_changes_none_of_its_settings():
    dm = ContinualDataModule(data=Digits(), epochs_per_task=2)
    trainer = quiet_trainer(max_epochs=10)
    with pytest.raises(ValueError, match=r"reload_dataloaders_every_n_epochs=0: .*set trainer\.reload_dataloaders_every_n_epochs: 1"):
        trainer.fit(Probe(), dm)
    assert trainer.reload_dataloaders_every_n_epochs == 0 and trainer.global_step == 0  # failed before training, set nothing


def test_the_nested_datamodule_keeps_its_own_hyperparameters_under_lightning_cli():
    """LightningCLI hands a nested datamodule the outer one's config as its hyperparameters unless it saves its own."""
    config = {"trainer": {"logger": False, "enable_checkpointing": False, "max_epochs": 5},
              "data": {"class_path": "datamodules.continual.ContinualDataModule",
                       "init_args": {"data": {"class_path": "datamodules.Digits", "init_args": {"batch_size": 32, "seed": 3}},
                                     "classes_per_task": 2, "cumulative": True}}}
    cli = LightningCLI(Probe, LightningDataModule, subclass_mode_data=True, run=False, args=config, save_config_callback=None)
    stream = cli.datamodule
    assert isinstance(stream, ContinualDataModule) and stream.cumulative is True
    hparams = dict(stream.data.hparams)
    assert hparams == {**dict(Digits().hparams), "batch_size": 32, "seed": 3}
    assert "classes_per_task" not in hparams and "data" not in hparams and stream.data.batch_size == 32


def test_bad_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="classes_per_task=3 does not divide the 10 classes"):
        ContinualDataModule(Digits(), classes_per_task=3)
    with pytest.raises(ValueError, match=r"missing \[9\], repeated \[0\]"):
        ContinualDataModule(Digits(), class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(ValueError, match=r"out of range \[10\]"):
        ContinualDataModule(Digits(), class_order=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    with pytest.raises(ValueError, match="scenario='online'"):
        ContinualDataModule(Digits(), scenario="online")
    dm = stream(classes_per_task=2)
    with pytest.raises(ValueError, match="task id 5 out of range: this stream has tasks 0..4"):
        dm.task_set("test", 5)
    with pytest.raises(ValueError, match="task id -1 out of range"):
        dm.task_classes(-1)
    trainer = quiet_trainer(max_epochs=7, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ValueError, match="trainer.max_epochs=7: .* needs max_epochs=10"):
        trainer.fit(Probe(), ContinualDataModule(Digits(), epochs_per_task=2))
