"""Cheap logging (issue 17 item 3): the epoch values are those of per-step ``self.log``, and a training step
does not wait for the host (no ``.item()`` / ``bool(tensor)`` per step)."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from datamodules import Digits
from zoo.batch import as_batch
from zoo.classifier import Classifier
from zoo.losses import CrossEntropy

MLP = {"model": "zoo/mlp", "model_kwargs": {"img_size": 8, "in_chans": 1, "hidden": [16]}, "num_classes": 10}
TERMS = [CrossEntropy(), CrossEntropy(weight=0.5, label_smoothing=0.2, name="smooth")]


class PerStepLogging(Classifier):
    """The logging of zoo.Classifier before issue 17: every value through ``self.log`` at every step."""

    def training_loss(self, batch):
        step_logits = []
        self.mask_logits = lambda logits, task: step_logits.append(logits) or logits
        total, logits, y = super().training_loss(batch)
        self.epoch_sums = {}  # drop what the new path accumulated: this class logs per step
        from zoo.losses import Step
        step = Step(self, batch, step_logits[0])
        for term in self.losses:
            self.log(f"train/{term.name}", term(step), on_step=False, on_epoch=True, batch_size=len(batch))
        return total, logits, y

    def training_step(self, batch, batch_idx):
        loss, logits, y = self.training_loss(as_batch(batch))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.train_metrics.update(logits.detach(), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, metrics, split):
        batch = as_batch(batch)
        logits = self.mask_logits(self.batch_logits(batch), batch.task)
        loss = self.criterion(logits, batch.targets)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", on_epoch=True, sync_dist=True, batch_size=len(batch))
        metrics.update(logits, batch.targets)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    def on_train_epoch_end(self):
        pass

    def on_validation_epoch_end(self):
        pass

    def on_test_epoch_end(self):
        pass


def fit(cls, epochs=2, **kw):
    seed_everything(0, verbose=False)
    model = cls(**MLP, losses=[t.config() for t in TERMS], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = Trainer(max_epochs=epochs, limit_train_batches=5, limit_val_batches=3, limit_test_batches=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=3, **kw)
    trainer.fit(model, Digits(batch_size=16))
    logged = {**trainer.logged_metrics, **{k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/") or k == "train/loss"}}
    trainer.test(model, Digits(batch_size=16), verbose=False)
    return trainer, {**logged, **trainer.logged_metrics}


@pytest.mark.parametrize("count_every", [None, 300])
def test_epoch_values_are_those_of_per_step_logging(count_every, monkeypatch):
    if count_every:  # hits counted every ~2 batches of 16 x 10 logits (and the rest at epoch end), not only at epoch end
        monkeypatch.setattr("zoo.classifier.HIT_BATCH_ELEMENTS", count_every)
    (_, new), (_, old) = fit(Classifier), fit(PerStepLogging)
    keys = ["train/loss_epoch", "train/cross_entropy", "train/smooth", "train/acc", "train/acc_top5",
            "val/loss", "val/acc", "val/acc_top5", "test/loss", "test/acc", "test/acc_top5"]
    assert set(keys) <= set(new) and set(keys) <= set(old)
    for key in keys:
        assert torch.equal(new[key], old[key]), key
    assert "train/loss_step" in new  # step 9 (log_every_n_steps=3) was a logging step
    assert torch.equal(new["train/loss"], new["train/loss_epoch"])  # callback_metrics: the epoch mean, as a monitor reads it
    assert torch.equal(new["train/loss"], old["train/loss"])


def test_train_acc_is_the_accuracy_over_the_epoch_by_hand():
    counts = []

    class Recording(Classifier):
        def on_train_epoch_start(self):
            counts.append([0, 0])

        def batch_logits(self, batch):  # once per training step
            logits = super().batch_logits(batch)
            if not self.training:
                return logits
            counts[-1][0] += int((logits.argmax(-1) == batch.targets).sum())
            counts[-1][1] += len(logits)
            return logits

    _, logged = fit(Recording, epochs=2)
    correct, total = counts[-1]
    assert total == 5 * 16
    # the second epoch only: the metric is reset between epochs
    assert logged["train/acc"].item() == correct / total


def test_no_host_sync_in_a_training_step(monkeypatch):
    syncs = []
    inside = [False]
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            if inside[0]:
                syncs.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)

    class Watched(Classifier):
        def training_step(self, batch, batch_idx):
            inside[0] = True
            try:
                return super().training_step(batch, batch_idx)
            finally:
                inside[0] = False

    trainer, _ = fit(Watched, epochs=1)
    assert trainer.global_step == 5
    assert syncs == []


def test_topk_accuracy_equals_torchmetrics_micro_accuracy():
    """The counters give torchmetrics' MulticlassAccuracy(average="micro") over several batches, top-1 and top-5,
    including logits masked to -inf (task-incremental streams)."""
    from torchmetrics.classification import MulticlassAccuracy

    from zoo.metrics import TopKAccuracy

    torch.manual_seed(0)
    for k in (1, 5):
        ours, ref = TopKAccuracy(top_k=k), MulticlassAccuracy(10, top_k=k, average="micro")
        for _ in range(5):
            logits, y = torch.randn(33, 10), torch.randint(0, 10, (33,))
            logits[:8, 5:] = float("-inf")
            ours.update(logits, y)
            ref.update(logits, y)
        assert ours.total == 165 and torch.equal(ours.compute(), ref.compute())
        assert 0 < ours.compute() < 1
    # ties count against the target: two classes left by a task mask, the target masked out, is no top-5 hit
    masked = torch.tensor([[1.0, 2.0] + [float("-inf")] * 8] * 2)
    assert TopKAccuracy(top_k=5).hits(masked, torch.tensor([7, 1])) == 1
    assert TopKAccuracy(top_k=2).hits(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([0])) == 0  # three tied for 2 places
    assert TopKAccuracy(top_k=2).hits(torch.tensor([[float("nan"), 1.0, 0.0]]), torch.tensor([0])) == 0


def test_top1_and_top5_stay_apart_after_a_perfect_first_batch():
    from zoo.classifier import accuracy_metrics

    metrics = accuracy_metrics(10, "val/")
    y = torch.arange(10)
    metrics.update(torch.eye(10), y)  # every sample right: both counters 10/10
    wrong = 2 * torch.eye(10).roll(1, -1) + torch.eye(10)  # top-1 wrong for all, the target second
    metrics.update(wrong, y)
    out = metrics.compute()
    assert out["val/acc"] == 0.5 and out["val/acc_top5"] == 1.0


def test_batches_move_field_by_field_and_stay_put_where_they_are():
    from zoo.batch import Batch
    from zoo.metrics import TopKAccuracy

    module = Classifier(model="zoo/mlp", num_classes=10, model_kwargs={"img_size": 8, "in_chans": 1, "hidden": [8]})
    batch = Batch(inputs=torch.randn(4, 1, 8, 8), targets=torch.arange(4), index=torch.arange(4))
    assert module.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch  # nothing to move: the same object
    text = Batch(inputs={"input_ids": torch.ones(2, 3, dtype=torch.long)}, targets=torch.arange(2))
    assert module.transfer_batch_to_device(text, torch.device("cpu"), 0) is text
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)  # a device without data: every field moved
    assert moved is not batch and all(getattr(moved, f).device.type == "meta" for f in ("inputs", "targets", "index"))
    assert moved.task is None and batch.inputs.device.type == "cpu"
    # counted hits handed over once equal per-batch updates
    logits, y = torch.randn(32, 10), torch.randint(0, 10, (32,))
    a, b = TopKAccuracy(top_k=5), TopKAccuracy(top_k=5)
    a.update(logits[:16], y[:16])
    a.update(logits[16:], y[16:])
    b.update(counts=(b.hits(logits[:16], y[:16]) + b.hits(logits[16:], y[16:]), 32))
    assert a.compute() == b.compute() and b.update_count == 1
