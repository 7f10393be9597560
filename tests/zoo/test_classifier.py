import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from datamodules import Digits
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.batch import Batch
from zoo.classifier import Classifier, param_groups
from zoo.losses import CrossEntropy, LossTerm
from zoo.surgery import Surgery


def tiny(**kw) -> Classifier:
    return Classifier(model=TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS, **kw)


def fit(model, max_steps=3, **kw) -> Trainer:
    trainer = Trainer(max_epochs=1, limit_train_batches=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2, **kw)
    trainer.fit(model, Digits(batch_size=32))
    return trainer


def test_no_weight_decay_on_norms_biases_and_timm_tokens():
    model = tiny()
    decay, no_decay = param_groups(model, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert all(p.ndim >= 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.norm.weight", "head.bias", "backbone.pos_embed", "backbone.cls_token"} <= no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_and_scheduler_come_from_callables():
    model = tiny(optimizer=lambda p: torch.optim.SGD(p, lr=0.5, weight_decay=0.1),
                 lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), scheduler_interval="step")
    conf = model.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert conf["lr_scheduler"]["interval"] == "step"
    trainer = fit(model, max_steps=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**2)
    assert trainer.global_step == 2


def test_training_changes_weights_and_logs_per_split_metrics():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fit(model, max_steps=3)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    logged = set(trainer.callback_metrics)
    assert {"train/loss_epoch", "train/acc", "train/acc_top5", "val/loss", "val/acc", "val/acc_top5"} <= logged
    assert 0.0 <= trainer.callback_metrics["val/acc"] <= trainer.callback_metrics["val/acc_top5"] <= 1.0


def test_top5_only_with_more_than_five_classes():
    assert list(Classifier(model="zoo/mlp", num_classes=5).val_metrics.keys()) == ["val/acc"]
    assert list(Classifier(model="zoo/mlp", num_classes=6).val_metrics.keys()) == ["val/acc", "val/acc_top5"]


def test_val_accuracy_matches_hand_computation():
    model = tiny().eval()
    dm = Digits(batch_size=64)
    dm.setup()
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(model, dm, verbose=False)
    with torch.no_grad():
        samples = [dm.val_set[i] for i in range(len(dm.val_set))]
        xs, ys = torch.stack([s.inputs for s in samples]), torch.tensor([s.targets for s in samples])
        acc = (model(xs).argmax(-1) == ys).float().mean()
    assert result["val/acc"] == pytest.approx(acc.item(), abs=1e-6)


class FocalClassifier(Classifier):
    """A new method as a subclass: override training_loss."""

    def __init__(self, gamma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma = gamma

    def training_loss(self, batch):
        logits = self(batch.inputs)
        logp = logits.log_softmax(-1).gather(1, batch.targets[:, None]).squeeze(1)
        return (-(1 - logp.exp()) ** self.gamma * logp).mean(), logits, batch.targets


class FocalLoss(LossTerm):
    """The README's example: a new loss term is one short class."""

    def __init__(self, weight: float = 1.0, gamma: float = 2.0):
        super().__init__(weight=weight)
        self.gamma = gamma

    def forward(self, step):
        logp = step.logits.log_softmax(-1).gather(1, step.targets[:, None]).squeeze(1)
        return (-(1 - logp.exp()) ** self.gamma * logp).mean()


class SwapActivation(Surgery):
    """The README's example: a new surgery is one short class (here: every ReLU becomes a SiLU, and back)."""

    def transform(self, model):
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.ReLU):
                model.set_submodule(name, nn.SiLU())
        return model

    def undo(self, model):
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.SiLU):
                model.set_submodule(name, nn.ReLU())
        return model


def test_subclass_overrides_the_loss():
    model = FocalClassifier(gamma=0.0, model="zoo/mlp", num_classes=10, model_kwargs={"in_chans": 1, "img_size": 8})
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, _, _ = model.training_loss(Batch(x, y))
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y))
    assert model.hparams.gamma == 0.0 and model.hparams.model == "zoo/mlp"
    fit(model, max_steps=2)


def test_loss_terms_are_summed_with_their_weights_and_logged_by_name(tmp_path):
    terms = [CrossEntropy(weight=0.25), FocalLoss(weight=0.75, gamma=2.0)]
    model = Classifier(model="zoo/mlp", num_classes=10, model_kwargs={"in_chans": 1, "img_size": 8}, losses=terms)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, logits, _ = model.training_loss(Batch(x, y))
    logp = model(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    by_hand = 0.25 * nn.functional.cross_entropy(model(x), y) + 0.75 * (-(1 - logp.exp()) ** 2 * logp).mean()
    torch.testing.assert_close(loss, by_hand)
    assert model.hparams.losses[1] == {"class_path": f"{__name__}.FocalLoss", "init_args": {"weight": 0.75, "gamma": 2.0}}
    trainer = fit(model, max_steps=2)
    assert {"train/cross_entropy", "train/focal_loss"} <= set(trainer.logged_metrics)


def test_surgery_runs_in_configure_model_and_undoes():
    model = Classifier(model="zoo/mlp", num_classes=10, model_kwargs={"in_chans": 1, "img_size": 8}, surgery=[SwapActivation()])
    x = torch.randn(4, 1, 8, 8)
    plain = model(x)
    assert any(isinstance(m, nn.ReLU) for m in model.backbone.modules())
    model.configure_model()
    model.configure_model()  # once only
    assert not any(isinstance(m, nn.ReLU) for m in model.backbone.modules()) and model.hparams.surgery[0]["class_path"].endswith("SwapActivation")
    assert not torch.equal(model(x), plain)
    model.unload_surgery()
    torch.testing.assert_close(model(x), plain)


def test_surgery_keeps_frozen_parts_frozen():
    class AddLayer(Surgery):  # makes a new parameter inside each Linear's parent
        def transform(self, model):
            model.backbone_extra = nn.Linear(2, 2)
            model.get_submodule("net").extra = nn.Linear(2, 2)
            return model

    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(2, 2)).requires_grad_(False)
    AddLayer()(model)
    assert not model.net.extra.weight.requires_grad and model.backbone_extra.weight.requires_grad


def test_bad_loss_terms_and_label_smoothing_with_losses():
    with pytest.raises(ValueError, match="losses=\\[\\]"):
        Classifier(model="zoo/mlp", losses=[])
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        Classifier(model="zoo/mlp", losses=[CrossEntropy()], label_smoothing=0.1)
    with pytest.raises(ValueError, match="weight=-1"):
        CrossEntropy(weight=-1)


@pytest.mark.parametrize("kwargs, match", [({"num_classes": 1}, "num_classes=1"), ({"scheduler_interval": "batch"}, "scheduler_interval='batch'")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Classifier(model="zoo/mlp", **kwargs)


def test_two_presets_do_not_mix_by_inheritance():
    from zoo.continual import ER
    from zoo.distillation import DistillationModule
    from zoo.snnet import SNNetModule
    from zoo.subtuning import SubTuningModule

    with pytest.raises(TypeError, match="SubTunedER inherits from the presets ER and SubTuningModule: .*Compose parts"):
        type("SubTunedER", (ER, SubTuningModule), {})
    with pytest.raises(TypeError, match="DistilledSNNet inherits from the presets SNNetModule and DistillationModule"):
        type("DistilledSNNet", (SNNetModule, DistillationModule), {})

    class MyER(ER):  # one preset, subclassed: fine
        pass

    assert MyER(model="zoo/mlp", buffer_size=4).hparams.buffer_size == 4
