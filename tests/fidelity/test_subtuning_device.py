"""Issue 16, item 12: the finetuning profile and greedy search run on the module's device, not on the CPU.

On this CPU-only machine the backbone is put on PyTorch's ``meta`` device: any ``.cpu()`` of it fails
("Cannot copy out of meta tensor"), and a head or batch left on the CPU would show up as a CPU parameter.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import callbacks.subtuning_profile as profile_cb
from callbacks.subtuning_profile import SubTuningProfile
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import build_backbone
from zoo.subtuning import SubTuningModule
from zoo.subtuning.profile import FULL, ProfileRunner

VIT4 = {**TINY_VIT_KWARGS, "depth": 4}
META = torch.device("meta")


def test_runner_trains_copies_on_the_backbones_device():
    torch.manual_seed(0)
    backbone = build_backbone(TINY_VIT, **VIT4).to(META)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))  # data on the CPU, moved batch by batch
    runner = ProfileRunner(backbone, 10, (x, y), (x, y), steps=2, batch_size=4)
    assert runner.device == META and runner.features("train", 2).device == META
    for layers, start in [(("blocks.2",), 2), (FULL, None)]:
        net, head, got = runner.fit(layers)
        assert got == start and net is not backbone
        assert {p.device for p in [*net.parameters(), *head.parameters()]} == {META}
    cv_idx = torch.arange(6)
    net, head, _ = runner.fit(("blocks.3",), cv_idx)  # the k-fold path indexes cached features on the device
    assert {p.device for p in [*net.parameters(), *head.parameters()]} == {META}


class Stop(Exception):
    pass


def test_callback_copies_the_backbone_to_the_trainers_root_device(monkeypatch):
    seen = {}

    def fake_runner(backbone, *args, **kwargs):
        seen["devices"] = {p.device for p in backbone.parameters()}
        seen["backbone"] = backbone
        raise Stop

    monkeypatch.setattr(profile_cb, "ProfileRunner", fake_runner)
    module = SubTuningModule(TINY_VIT, num_classes=10, model_kwargs=VIT4)
    dm = Digits(samples_per_class=4)
    dm.setup()
    trainer = SimpleNamespace(fast_dev_run=True, strategy=SimpleNamespace(root_device=META))
    with pytest.raises(Stop):
        SubTuningProfile(steps=1, k=1).run(trainer, module, dm)
    assert seen["devices"] == {META}
    assert seen["backbone"] is not module.backbone and {p.device.type for p in module.backbone.parameters()} == {"cpu"}
