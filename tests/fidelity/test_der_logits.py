"""Issue 16 item 22: DER / DER++ / ER as in Mammoth (github:aimagelab/mammoth models/der.py, derpp.py, er.py).

- The buffer stores, for each inserted sample, the network's output on the batch as the step computed it: all
  classes (never task-masked), in train mode, before the optimizer step (der.py ``add_data(..., logits=outputs.data)``
  after ``opt.step()``, ``outputs`` computed before it).
- DER's term is ``alpha * F.mse_loss(net(buf_inputs), buf_logits)`` (mean over samples and all classes), added to
  the batch's cross-entropy; DER++ adds ``beta`` x cross-entropy on a second draw.
- ER (er.py) concatenates the draw to the batch, runs ONE forward over both (BatchNorm statistics over the joined
  batch) and takes one cross-entropy over both (``combine: concat``).
- The presets configs/continual/{er,der,derpp}_seq_{mnist,cifar10}.yaml hold Mammoth's best arguments
  (utils/best_args.py, buffer 500), and the replay terms' ``replace`` is settable from YAML.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import seed_everything

from tests.helpers import ROOT
from tests.zoo.test_continual import MLP, attach, first_batch
from zoo.continual import DER, ER, DERpp, ExperienceReplay

CNN = {"model": "zoo/convnet", "model_kwargs": {"widths": [4, 8]}}  # BatchNorm: train-mode and eval-mode outputs differ


def test_stored_logits_are_the_train_mode_output_before_the_update_on_all_classes():
    seed_everything(0)
    model = DER(**CNN, buffer_size=50, alpha=1.0, replay_batch_size=4)
    stream = attach(model, scenario="task")  # task-IL: the cross-entropy masks the logits, the buffer must not
    batch = first_batch(stream, 1, 12)
    before = copy.deepcopy(model).train()
    with torch.no_grad():
        by_hand = before(batch.inputs)  # Mammoth: outputs = self.net(inputs), model in train mode
        eval_mode = copy.deepcopy(before).eval()(batch.inputs)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _, _ = model.training_loss(batch)
    loss.backward()
    opt.step()  # Mammoth inserts after the step, the logits computed before it
    stored = model.buffer.logits[:12]
    assert len(model.buffer) == 12 and torch.equal(model.buffer.y[:12], batch.targets)
    assert torch.allclose(stored, by_hand, atol=1e-6)
    assert stored.shape == (12, 10) and torch.isfinite(stored).all()  # all 10 classes, none masked out
    assert not torch.allclose(stored, eval_mode, atol=1e-3)  # not the eval-mode output
    with torch.no_grad():
        assert not torch.allclose(stored, model(batch.inputs), atol=1e-3)  # not the output after the update


@pytest.mark.parametrize("cls,kwargs", [(DER, {"alpha": 0.7}), (DERpp, {"alpha": 0.7, "beta": 0.4})])
def test_der_loss_is_ce_plus_alpha_mse_on_unmasked_logits(cls, kwargs):
    seed_everything(1)
    model = cls(**MLP, buffer_size=30, replay_batch_size=6, **kwargs)
    stream = attach(model, scenario="task")
    old = first_batch(stream, 0, 16)
    z = torch.randn(16, 10) * 3
    model.buffer.add(old.raw, old.targets, old.task, z)
    batch = first_batch(stream, 1, 8)
    before = copy.deepcopy(model.buffer)
    loss, _, _ = model.training_loss(batch)
    model.buffer = before  # the same draws (before the batch's insertion), by hand
    x1, _, _, z1 = model.replay(6)
    out = model(x1)
    mse = ((out - z1) ** 2).sum() / out.numel()  # F.mse_loss(buf_outputs, buf_logits): mean over samples and all classes
    expected = F.cross_entropy(model.mask_logits(model(batch.inputs), batch.task), batch.targets) + kwargs["alpha"] * mse
    if "beta" in kwargs:  # DER++: a second, independent draw
        x2, y2, t2, _ = model.replay(6)
        expected = expected + kwargs["beta"] * F.cross_entropy(model.mask_logits(model(x2), t2), y2)
    assert len(x1) == 6 and z1.abs().sum() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("net,combine", [("mlp", "concat"), ("mlp", "sum"), ("cnn", "concat")])
def test_er_is_one_cross_entropy_over_batch_and_draw(net, combine):
    """concat: Mammoth er.py's step (cat, ONE forward, one cross-entropy); with BatchNorm (cnn) the statistics are
    over the joined batch, which two forwards (batch, then draw) would not reproduce."""
    seed_everything(2)
    model = ER(**(MLP if net == "mlp" else CNN), buffer_size=30, replay_batch_size=5,
               losses=[{"class_path": "zoo.losses.CrossEntropy"}, {"class_path": "zoo.continual.ExperienceReplay", "init_args": {"combine": combine}}])
    stream = attach(model)
    old = first_batch(stream, 0, 16)
    model.buffer.add(old.raw, old.targets, old.task, torch.zeros(16, 10))
    batch = first_batch(stream, 1, 8)
    before = copy.deepcopy(model.buffer)
    model.train()
    loss, logits, _ = model.training_loss(batch)
    after, model.buffer = model.buffer, before
    xb, yb, _, _ = model.replay(5)
    if combine == "concat":  # Mammoth er.py: inputs = cat(inputs, buf_inputs); loss(net(inputs), cat(labels, buf_labels))
        out = model(torch.cat([batch.inputs, xb]))
        expected = F.cross_entropy(out, torch.cat([batch.targets, yb]))
        assert torch.allclose(after.logits[16:24], out[:8], atol=1e-6)  # the buffer stores the batch's rows of that forward
        assert torch.allclose(logits, out[:8], atol=1e-6)  # accuracy counts the batch only
        two_forwards = (8 * F.cross_entropy(model(batch.inputs), batch.targets) + 5 * F.cross_entropy(model(xb), yb)) / 13
        assert (net == "cnn") != (abs(two_forwards.item() - expected.item()) < 1e-6)  # the old path: same only without BatchNorm
    else:
        expected = F.cross_entropy(model(batch.inputs), batch.targets) + F.cross_entropy(model(xb), yb)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    assert ExperienceReplay().combine == "concat"  # the official combination is the default


def test_replace_is_settable_from_yaml():
    model = ER(**MLP, buffer_size=20, losses=[{"class_path": "zoo.losses.CrossEntropy"},
                                              {"class_path": "zoo.continual.ExperienceReplay", "init_args": {"replace": True, "batch_size": 8}}])
    stream = attach(model)
    batch = first_batch(stream, 0, 3)
    model.buffer.add(batch.raw, batch.targets, batch.task, torch.zeros(3, 10))
    term = model.loss_term(ExperienceReplay)
    assert term.replace and model.hparams.losses[1]["init_args"]["replace"] is True
    assert len(term.draw(model)[0]) == 8  # with replacement: more than the 3 stored
    assert len(ExperienceReplay(batch_size=8).draw(model)[0]) == 3  # default: distinct samples, at most all stored


# Hand-copied from github:aimagelab/mammoth utils/best_args.py, best_args[dataset][method][500]
MAMMOTH = {
    ("seq-mnist", "er"): {"lr": 0.1, "minibatch_size": 10, "batch_size": 10, "n_epochs": 1},
    ("seq-mnist", "der"): {"lr": 0.03, "minibatch_size": 128, "alpha": 1.0, "batch_size": 10, "n_epochs": 1},
    ("seq-mnist", "derpp"): {"lr": 0.03, "minibatch_size": 10, "alpha": 1.0, "beta": 0.5, "batch_size": 10, "n_epochs": 1},
    ("seq-cifar10", "er"): {"lr": 0.1, "minibatch_size": 32, "batch_size": 32, "n_epochs": 50},
    ("seq-cifar10", "der"): {"lr": 0.03, "minibatch_size": 32, "alpha": 0.3, "batch_size": 32, "n_epochs": 50},
    ("seq-cifar10", "derpp"): {"lr": 0.03, "minibatch_size": 32, "alpha": 0.2, "beta": 0.5, "batch_size": 32, "n_epochs": 50},
}


@pytest.mark.parametrize("dataset,method", list(MAMMOTH))
def test_presets_hold_mammoths_best_args(dataset, method):
    conf = yaml.safe_load((ROOT / "configs" / "continual" / f"{method}_{dataset.replace('-', '_')}.yaml").read_text())
    model, data = conf["model"]["init_args"], conf["data"]["init_args"]
    opt = model["optimizer"]
    found = {"lr": opt["init_args"]["lr"], "minibatch_size": model["replay_batch_size"], "batch_size": data["data"]["init_args"]["batch_size"],
             "n_epochs": data["epochs_per_task"], **{k: model[k] for k in ("alpha", "beta") if k in model}}
    assert found == MAMMOTH[dataset, method]
    assert conf["model"]["class_path"] == {"er": "zoo.continual.ER", "der": "zoo.continual.DER", "derpp": "zoo.continual.DERpp"}[method]
    assert opt["class_path"] == "torch.optim.SGD" and opt["init_args"].get("momentum", 0) == 0 and opt["init_args"].get("weight_decay", 0) == 0
    assert model["buffer_size"] == 500 and data["scenario"] == "class" and data["classes_per_task"] == 2
    assert conf["trainer"]["max_epochs"] == 5 * data["epochs_per_task"]
    if dataset == "seq-mnist":  # Mammoth's mnistmlp: 784-100-100-10
        assert model["model"] == "zoo/mlp" and model["model_kwargs"]["hidden"] == [100, 100]
