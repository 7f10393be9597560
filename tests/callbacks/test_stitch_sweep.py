"""StitchSweep: accuracy of every stitch equals running each alone; Pareto front, budget pick, CSV, figure."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.stitch_sweep import StitchSweep, best_under_budget, pareto_front, stitch_accuracy
from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.snnet import SNNetModule


def anchor_spec(width: int) -> dict:
    return {"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": width}}


def test_pareto_front_and_budget_pick():
    flops = [1, 2, 2, 3, 5, 6]
    acc = [0.5, 0.4, 0.6, 0.6, 0.8, 0.7]
    assert pareto_front(flops, acc) == [True, False, True, False, True, False]
    rows = [{"id": i, "macs": f, "flops": 2 * f, "acc": a, "latency_ms": 10.0 * f} for i, (f, a) in enumerate(zip(flops, acc))]
    assert best_under_budget(rows, max_flops=3)["id"] == 0  # FLOPs: 2 per multiply-add
    assert best_under_budget(rows, max_macs=3)["id"] == 2  # ties on accuracy: fewer MACs
    assert best_under_budget(rows, max_macs=5, max_flops=6)["id"] == 2  # every budget applies
    assert best_under_budget(rows, max_latency_ms=55)["id"] == 4
    assert best_under_budget(rows, max_flops=0.5) is None


def test_shared_prefix_accuracy_equals_each_stitch_alone():
    torch.manual_seed(0)
    module = SNNetModule([anchor_spec(32), anchor_spec(16), anchor_spec(48)], two_way=True)
    net = module.net.eval()
    dm = Digits(batch_size=50)
    dm.setup()
    net.init_stitching_layers(next(iter(dm.train_dataloader())).inputs)
    batches = [b for _, b in zip(range(3), dm.val_dataloader())]
    acc = stitch_accuracy(net, batches)
    with torch.no_grad():
        ref = [sum(int((net(b.inputs, s).argmax(-1) == b.targets).sum()) for b in batches) / sum(len(b.targets) for b in batches) for s in range(len(net))]
    assert acc == pytest.approx(ref) and len(set(ref)) > 3


def test_callback_writes_csv_figure_and_selects_best_in_budget(tmp_path):
    module = SNNetModule([anchor_spec(32), anchor_spec(16)])
    budget = (module.net.macs(0) + module.net.macs(1)) / 2
    sweep = StitchSweep(max_macs=budget, csv_path=str(tmp_path / "sweep.csv"), latency_repeats=1, limit_batches=2)
    trainer = L.Trainer(max_steps=3, logger=TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=1, callbacks=[sweep])
    trainer.fit(module, Digits(batch_size=32))
    with open(tmp_path / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in rows] == list(range(len(module.net)))
    assert set(rows[0]) == {"id", "kind", "description", "macs", "flops", "params", "latency_ms", "acc", "pareto"}
    assert all(2 * int(r["macs"]) == int(r["flops"]) for r in rows)
    assert all(float(r["latency_ms"]) > 0 and 0 <= float(r["acc"]) <= 1 for r in rows)
    fits = [r for r in sweep.rows if r["macs"] <= budget]
    assert sweep.best["acc"] == max(r["acc"] for r in fits) and sweep.best["macs"] <= budget
    assert module.net.active == sweep.best["id"]
    assert any(r["pareto"] for r in sweep.rows if r["id"] == min(sweep.rows, key=lambda r: r["macs"])["id"])
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert "snnet/acc_vs_flops" in events.Tags()["images"]


def test_callback_rejects_modules_without_a_stitchable_net(tmp_path):
    from zoo.classifier import Classifier

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu", callbacks=[StitchSweep()])
    with pytest.raises(TypeError, match="needs a module with a StitchableNet"):
        trainer.fit(Classifier(model=TINY_VIT, model_kwargs=TINY_VIT_KWARGS), Digits(batch_size=32))
    with pytest.raises(ValueError, match="max_latency_ms needs measure_latency=true"):
        StitchSweep(max_latency_ms=3, measure_latency=False)
