"""ContinualDataModule: disjoint and complete task splits, class orders, scenarios, raw inputs, bad inputs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules import Digits
from datamodules.continual import ContinualDataModule
from zoo.continual import FineTune


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
    x, y, t, raw = dm.task_set("train", 3)[0]
    assert t == 3 and y in (6, 7) and raw.dtype == torch.uint8 and raw.shape == (1, 8, 8)
    assert torch.allclose(dm.buffer_transform(raw[None])[0], x)  # the buffer re-applies the training transform
    assert len(dm.task_set("val", 0)[0]) == 3  # (x, y, task) for evaluation


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
    trainer = Trainer(max_epochs=7, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="trainer.max_epochs=7: .* needs max_epochs=10"):
        trainer.fit(FineTune(model_kwargs={"img_size": 8, "hidden": [16]}), ContinualDataModule(Digits(), epochs_per_task=2))
