"""Evaluation without rebuilding loaders (issue 17 item 4) and without rank-0-only state (issue 18 item 4).

:func:`datamodules.tensor.eval_batches` reads a split from its in-memory tensors in large gathered batches: the same
samples, in the same order, with the same inputs as the datamodule's own loaders (and through a ``DataLoader`` for data
that cannot gather); each rank reads its share. Continual ``evaluate_task`` gives the accuracies (and logits) of the
old per-task ``DataLoader``. One 2-process gloo run checks StitchSweep's sharded sweep and broadcast pick and the
continual accuracy matrix summed over ranks (run as ``python -m tests.datamodules.test_eval_fast <out_dir>``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import ContinualDataModule, Digits
from datamodules.resumable import eval_loader
from datamodules.tensor import eval_batches, gather_source
from tests.helpers import ROOT, TINY_VIT, TINY_VIT_KWARGS
from zoo.batch import FIELDS

ANCHORS = [{"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": w}} for w in (32, 16)]
MLP = {"model": "zoo/mlp", "model_kwargs": {"img_size": 8, "hidden": [32, 32]}}


def cat(batches: list) -> dict:
    return {f: torch.cat([getattr(b, f) for b in batches]) for f in FIELDS if getattr(batches[0], f) is not None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].dtype == b[f].dtype and torch.equal(a[f], b[f]), f


@pytest.mark.parametrize("kwargs", [dict(with_index=True), dict(transform_on_device=True, image_size=16)])
def test_eval_batches_are_the_loaders_samples_and_shard_over_ranks(kwargs):
    dm = Digits(batch_size=32, **kwargs)
    dm.setup()
    for split in ("val", "test"):
        subset = dm.split(split)
        reference = cat([b.ready() for b in eval_loader(subset, 32)])  # what the datamodule's loader yields
        got = list(eval_batches(subset, 100))
        assert [len(b) for b in got] == [100] * (len(subset) // 100) + [len(subset) % 100]
        assert_same(cat(got), reference)
        shards = [list(eval_batches(subset, 50, rank=r, world_size=3, limit=301)) for r in range(3)]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank (sharded forwards)
        assert_same(cat([b for s in shards for b in s]), {f: v[:301] for f, v in reference.items()})
    stream = ContinualDataModule(Digits(batch_size=32, **kwargs), classes_per_task=2)
    stream.setup()
    loader = stream.test_dataloader()  # a Subset (seeded order) of the concatenated tasks: still gathered
    assert gather_source(loader.dataset) is not None
    assert_same(cat(list(eval_batches(loader.dataset, 64))), cat([b.ready() for b in loader]))


def test_data_that_cannot_gather_is_read_through_a_loader_with_the_same_samples():
    fast, slow = Digits(batch_size=32, with_index=True), Digits(batch_size=32, with_index=True, fast=False)
    fast.setup()
    slow.setup()
    assert gather_source(slow.val_set) is None
    a, b = cat(list(eval_batches(fast.val_set, 64))), cat(list(eval_batches(slow.val_set, 64, rank=1, world_size=2)))
    half = len(fast.val_set) // 2
    assert torch.equal(a["targets"][half:], b["targets"]) and torch.equal(a["index"][half:], b["index"])
    torch.testing.assert_close(a["inputs"][half:], b["inputs"])  # BatchTransform vs torchvision: the same values


def old_evaluate_task(module, task: int) -> tuple[float, torch.Tensor]:
    """The pre-issue-17 evaluation: a fresh DataLoader of 256 per task."""
    loader = DataLoader(module.stream.task_set("test", task), batch_size=256, collate_fn=module.stream.collate_fn)
    logits, correct, total = [], 0, 0
    with torch.no_grad():
        for batch in loader:
            batch = batch.ready()
            logits.append(module.mask_logits(module(batch.inputs), batch.task))
            correct += int((logits[-1].argmax(-1) == batch.targets).sum())
            total += len(batch)
    return correct / total, torch.cat(logits)


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_evaluate_task_gives_the_old_loaders_accuracies_and_logits(scenario):
    from lightning.pytorch import Trainer, seed_everything

    from zoo.continual import FineTune

    seed_everything(0)
    module = FineTune(**MLP)
    stream = ContinualDataModule(Digits(batch_size=16), scenario=scenario, classes_per_task=2)
    trainer = Trainer(max_epochs=5, reload_dataloaders_every_n_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, stream)
    module.eval()
    old = [old_evaluate_task(module, t) for t in range(5)]
    assert torch.equal(module.acc_matrix[4], torch.tensor([acc for acc, _ in old]))  # the last row: the final weights, every task
    assert [module.evaluate_task(t, batch_size=7) for t in range(5)] == [acc for acc, _ in old]
    with torch.no_grad():
        fast = [torch.cat([module.mask_logits(module(b.inputs), b.task) for b in eval_batches(stream.task_set("test", t), 256)]) for t in range(5)]
    assert all(torch.equal(f, o) for f, (_, o) in zip(fast, old))  # the same batches: identical logits
    assert len({acc for acc, _ in old}) > 1


@pytest.mark.parametrize("seen_only", [True, False])
def test_class_incremental_rows_test_the_classes_seen_so_far_as_mammoth(seen_only):
    """``eval_seen_classes`` (default, Mammoth's ``evaluate``): the accuracy matrix's row ``t`` predicts among the
    classes of tasks ``0..t`` (their labels are ``0 .. 2(t + 1) - 1``), computed by hand at every task end from the old
    loaders' logits; false: among all classes."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from zoo.continual import FineTune

    by_hand = {True: {}, False: {}}

    class ByHand(Callback):
        def on_task_end(self, trainer, module, task, final):
            module.eval()
            for j in range(task + 1):
                _, logits = old_evaluate_task(module, j)
                targets = torch.cat([b.targets for b in DataLoader(module.stream.task_set("test", j), batch_size=256, collate_fn=module.stream.collate_fn)])
                for seen, z in ((True, logits[:, :2 * (task + 1)]), (False, logits)):
                    by_hand[seen][task, j] = float((z.argmax(-1) == targets).double().mean())
            module.train()

    seed_everything(0)
    module = FineTune(**MLP, eval_seen_classes=seen_only)
    trainer = Trainer(max_epochs=5, reload_dataloaders_every_n_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[ByHand()])
    trainer.fit(module, ContinualDataModule(Digits(batch_size=16), classes_per_task=2))
    got = {k: float(module.acc_matrix[k]) for k in by_hand[seen_only]}
    assert len(got) == 15 and got == pytest.approx(by_hand[seen_only], rel=1e-6)  # (the matrix is float32)
    assert by_hand[True] != pytest.approx(by_hand[False], abs=0.01)  # the two protocols differ on this stream
    assert all(by_hand[True][4, j] == by_hand[False][4, j] for j in range(5))  # but not after the last task


def test_profile_data_is_the_items_stacked_in_the_seeded_order():
    from zoo.subtuning.profile import stack_dataset

    dm = Digits(transform_on_device=True, samples_per_class=20)
    dm.setup()
    x, y = stack_dataset(dm.train_set, limit=50, seed=4, batch_size=16)
    idx = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(4))[:50].tolist()
    items = [dm.train_set.view(dm.eval_transform(), with_index=False)[i] for i in idx]  # one by one, transformed
    assert torch.equal(x, torch.stack([b.inputs for b in items])) and y.tolist() == [b.targets for b in items]


def test_cache_placement_cpu_pinned_for_a_gpu_auto_by_size():
    from zoo.subtuning.cache import AUTO_MAX_BYTES, cache_placement

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert cache_placement("cpu", cuda) == (cpu, True)  # CPU memory, pinned: features come from a GPU
    assert cache_placement("cpu", cpu) == (cpu, False)
    assert cache_placement("auto", cuda, AUTO_MAX_BYTES) == (cuda, False)  # small: stays on the GPU
    assert cache_placement("auto", cuda, AUTO_MAX_BYTES + 1) == (cpu, True)  # large: CPU, pinned
    assert cache_placement(None, cpu, 10 * AUTO_MAX_BYTES) == (cpu, False)
    assert cache_placement("cuda:1", cpu) == (torch.device("cuda", 1), False)
    with pytest.raises(ValueError, match="cache_device='gpu0'"):
        cache_placement("gpu0", cpu)


@pytest.mark.parametrize("cache_device", ["cpu", "auto"])
def test_feature_cache_keeps_rows_where_asked_and_returns_them_on_the_inputs_device(cache_device):
    from zoo.subtuning.cache import FeatureCache

    weight = torch.randn(4, 3)
    calls = []

    def compute(x):
        calls.append(len(x))
        return x @ weight

    cache, x = FeatureCache(list(range(10)), cache_device=cache_device), torch.randn(10, 4)
    first = cache.lookup(torch.tensor([1, 3]), x[[1, 3]], compute)
    again = cache.lookup(torch.tensor([3, 7, 1]), x[[3, 7, 1]], compute)
    assert calls == [2, 1] and cache.values.device.type == "cpu" and not cache.pinned  # no GPU here: never pinned
    assert torch.equal(first, x[[1, 3]] @ weight) and torch.equal(again, x[[3, 7, 1]] @ weight)
    state = FeatureCache.from_states([cache.state()], cache_device=cache_device)
    assert torch.equal(state.lookup(torch.tensor([7]), x[[7]], compute), x[[7]] @ weight) and calls == [2, 1] and state.placed


# -- one 2-process gloo run: StitchSweep (sharded sweep, broadcast pick) and evaluate_task (counts summed) ------------


def ddp_main(out_dir: str) -> None:
    """Rank ``r`` of a 2-process CPU DDP run: fit an SN-Net with a StitchSweep, then a continual stream; save what each rank holds."""
    from lightning.pytorch import Trainer, seed_everything

    from callbacks.stitch_sweep import StitchSweep
    from zoo.continual import FineTune
    from zoo.snnet import SNNetModule

    common = dict(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    seed_everything(0)
    snnet = SNNetModule(ANCHORS, init_batch_size=16)
    budget = (snnet.net.macs(0) + snnet.net.macs(1)) / 2
    sweep = StitchSweep(max_macs=budget, csv_path=str(Path(out_dir) / "sweep.csv"), latency_repeats=1, batch_size=20)
    trainer = Trainer(strategy="ddp_find_unused_parameters_true", max_steps=3, limit_val_batches=0, callbacks=[sweep], **common)
    trainer.fit(snnet, Digits(batch_size=16))
    seed_everything(0)
    finetune = FineTune(**MLP)
    trainer2 = Trainer(strategy="ddp", max_epochs=5, reload_dataloaders_every_n_epochs=1, limit_train_batches=3, limit_val_batches=0, **common)
    trainer2.fit(finetune, ContinualDataModule(Digits(batch_size=16), classes_per_task=2))
    torch.save({"acc": [r["acc"] for r in sweep.rows], "best": sweep.best["id"], "active": snnet.net.active,
                "snnet": {k: v.cpu() for k, v in snnet.state_dict().items()}, "acc_matrix": finetune.acc_matrix,
                "finetune": {k: v.cpu() for k, v in finetune.state_dict().items()}}, Path(out_dir) / f"rank{trainer.global_rank}.pt")


def test_ddp_sweep_and_task_evaluation_are_sharded_and_every_rank_ends_with_the_same_numbers(tmp_path):
    from callbacks.stitch_sweep import best_under_budget, stitch_counts
    from zoo.continual import FineTune
    from zoo.snnet import SNNetModule

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.datamodules.test_eval_fast", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["acc"] == ranks[1]["acc"] and ranks[0]["active"] == ranks[1]["active"] == ranks[0]["best"] == ranks[1]["best"]

    snnet = SNNetModule(ANCHORS, init_batch_size=16)  # reference: the whole validation split in one process
    snnet.configure_model()
    snnet.load_state_dict(ranks[0]["snnet"])
    dm = Digits(batch_size=16)
    dm.setup()
    counts = stitch_counts(snnet.net, eval_batches(dm.val_set, 20))
    ref = (counts[:-1].double() / counts[-1]).tolist()
    assert max(abs(a - r) for a, r in zip(ranks[0]["acc"], ref)) <= 1 / len(dm.val_set) + 1e-12  # (argmax ties across batch shapes)
    assert len(set(ref)) > 2 and counts[-1] == len(dm.val_set)
    rows = [{"id": i, "macs": snnet.net.macs(i), "flops": 2 * snnet.net.macs(i), "acc": a, "latency_ms": None} for i, a in enumerate(ranks[0]["acc"])]
    assert ranks[0]["best"] == best_under_budget(rows, max_macs=(snnet.net.macs(0) + snnet.net.macs(1)) / 2)["id"]

    finetune = FineTune(**MLP)
    finetune.configure_model()
    finetune.load_state_dict(ranks[0]["finetune"])
    stream = ContinualDataModule(Digits(batch_size=16), classes_per_task=2)
    stream.setup()
    finetune.stream = stream
    finetune.register_buffer("task_mask", torch.ones(5, 10, dtype=torch.bool), persistent=False)
    finetune.eval()
    last = [old_evaluate_task(finetune, t)[0] for t in range(5)]
    assert torch.equal(ranks[0]["acc_matrix"].nan_to_num(-1), ranks[1]["acc_matrix"].nan_to_num(-1))
    assert torch.equal(ranks[0]["acc_matrix"][4], torch.tensor(last))  # each rank tested half of every task; the counts were summed


if __name__ == "__main__":
    ddp_main(sys.argv[1])


def test_freeze_passes_its_cache_device_to_the_module_caches():
    from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
    from zoo.subtuning import Freeze

    with pytest.raises(ValueError, match="gpu0"):
        Freeze(trainable_layers=[1], cache_device="gpu0")
    freeze = Freeze(trainable_layers=[1], cache_frozen_features=True, cache_device="cpu")
    assert freeze.config()["init_args"]["cache_device"] == "cpu"  # kept in the checkpoint's hyperparameters
    from zoo import Classifier
    from zoo.subtuning.prefix import FrozenPrefix

    class Probe(FrozenPrefix, Classifier):
        pass

    m = Probe(model=TINY_VIT, model_kwargs=TINY_VIT_KWARGS, surgery=[freeze])
    m.configure_model()
    x, index = torch.randn(4, 1, 8, 8), torch.arange(4)
    m.cached_prefix(x, index)
    assert m.caches["train"].cache_device == "cpu"
