"""Combination 4: SubTuning inside a continual stream with ER (configs/compose/subtuning_er.yaml).

The config runs (shrunk: stand-in data, 32x32 images, 2 tasks of 3 epochs) and the test checks that both parts
really happened: only the chosen stages (and the head) changed, bit for bit everywhere else (frozen BatchNorm
statistics included); the replay term was logged and the buffer filled; the feature cache holds exactly the stream's
samples, each row the prefix output of the sample at that dataset index; replayed samples, which have no index, run
the whole network and never touch the cache; a stream without indices is refused before training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import cli
from tests.helpers import ROOT
from tests.standin import point_data_dirs, standin_args, write_mnist_like
from zoo.batch import Batch
from zoo.continual import ER, ExperienceReplay
from zoo.subtuning import Freeze

CONFIG = ROOT / "configs" / "compose" / "subtuning_er.yaml"
TRAINED = ("backbone.blocks.5.", "backbone.blocks.6.", "head.")


class Snapshot(Callback):
    """The module's state when training starts (after the surgery)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def run(tmp_path: Path, *extra: str):
    data = tmp_path / "data"
    write_mnist_like(data, "FashionMNIST", seed=1)
    text = CONFIG.read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(data))
    patched = tmp_path / CONFIG.name
    patched.write_text(yaml.safe_dump(conf))
    return cli.main(["fit", "--config", str(patched), *standin_args(text), "--trainer.max_epochs=6", "--trainer.limit_val_batches=1",
                     "--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
                     "--data.init_args.data.init_args.batch_size=8", "--data.init_args.data.init_args.image_size=32",
                     "--model.init_args.replay_batch_size=8", "--trainer.callbacks+=tests.compose.test_subtuning_er.Snapshot", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run(tmp_path_factory.mktemp("subtuning_er"))


def test_only_the_chosen_layers_change_and_replay_ran(trained):
    model, trainer = trained.model, trained.trainer
    assert isinstance(model, ER) and isinstance(model.surgery[0], Freeze) and model.trainable_names == ["blocks.5", "blocks.6"]
    (snap,) = [c for c in trainer.callbacks if isinstance(c, Snapshot)]
    after = model.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, snap.state[k])}
    assert changed and all(k.startswith(TRAINED) for k in changed), sorted(k for k in changed if not k.startswith(TRAINED))[:5]
    assert {k.split(".")[0] if k.startswith("head.") else ".".join(k.split(".")[:3]) for k in changed} == {"head", "backbone.blocks.5", "backbone.blocks.6"}
    assert any("running_mean" in k for k in after if not k.startswith(TRAINED))  # frozen BatchNorm statistics were compared too
    # ER's default combine: concat logs what replay adds to the batch's cross-entropy (signed; 0 only without replay)
    assert trainer.logged_metrics["train/experience_replay"] != 0 and "train/cross_entropy" in trainer.logged_metrics
    stream = trainer.datamodule
    seen = sum(len(stream.task_set("train", t)) for t in range(2)) * 3  # 2 tasks x 3 epochs, every sample each epoch
    assert model.buffer.seen == seen and len(model.buffer) == min(seen, 200)
    assert model.tasks_finished == 2 and not model.acc_matrix[:2].tril().isnan().any()


def test_the_cache_holds_the_streams_samples_by_dataset_index(trained):
    model, stream = trained.model, trained.trainer.datamodule
    cache = model.caches["train"]
    split = stream.data.train_set  # the stream's index space: the nested datamodule's training split
    assert cache.source is split
    tasks = [stream.task_set("train", t) for t in range(2)]
    assert set(cache.rows().tolist()) == {p for ts in tasks for p in ts.positions}  # each sample of both tasks, once
    model.eval()
    rows = cache.rows()[:: max(1, len(cache.rows()) // 6)].tolist()
    x = torch.stack([split[i].inputs for i in rows])
    assert torch.allclose(cache.values[rows], model._uncached_prefix(x), atol=1e-5)


def test_replayed_samples_run_the_whole_network_not_the_cache(trained):
    model = trained.model.train()
    term = model.loss_term(ExperienceReplay)
    cache = model.caches["train"]
    filled, calls = int(cache.filled.sum()), []
    prefix = model.chain.prefix
    model.chain.prefix = lambda x, s: (calls.append(len(x)), prefix(x, s))[1]
    try:
        state = model.buffer.sample_rng.get_state()
        value = term.replay_loss(model)  # the draw's cross-entropy (combine: concat then mixes it with the batch's)
        model.buffer.sample_rng.set_state(state)  # the same draw, by hand: a plain forward of the whole backbone
        x, y, t, _ = model.replay(8)
        with torch.no_grad():
            expected = model.criterion(model.mask_logits(model.head(model.backbone(x)), t), y)
    finally:
        model.chain.prefix = prefix
    assert calls == [8] and int(cache.filled.sum()) == filled  # the prefix ran on the 8 replayed samples; no cache row
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs the batch field 'index'.*with_index: true"):
        model.training_loss(Batch(x, y, task=t, raw=x))  # a training batch without indices is refused, not cached by position


def test_a_stream_without_indices_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="set data.init_args.data.init_args.with_index: true"):
        run(tmp_path, "--data.init_args.data.init_args.with_index=false")
