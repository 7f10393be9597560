"""Continual learning: reservoir/balanced buffers, metrics, DER++ loss, FPF, task masking, exact resume, DDP."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.stats import chisquare

from callbacks.checkpoint import Checkpoint
from callbacks.continual_metrics import ContinualMetrics, average_accuracy, average_forgetting, backward_transfer
from datamodules import Digits
from datamodules.continual import ContinualDataModule
from tests.helpers import run_ddp
from zoo.batch import Batch
from zoo.classifier import Classifier
from zoo.continual import DER, ER, KFPF, ContinualClassifier, DarkReplay, DERpp, ExperienceReplay, FineTune, Joint, module_drift
from zoo.continual.buffer import ReplayBuffer
from zoo.losses import CrossEntropy

MLP = {"model": "zoo/mlp", "model_kwargs": {"img_size": 8, "hidden": [32, 32]}}


def offer(buffer: ReplayBuffer, start: int, labels: list[int]) -> None:
    n = len(labels)
    ids = torch.arange(start, start + n)
    buffer.add(ids[:, None].to(torch.uint8), torch.tensor(labels), torch.zeros(n, dtype=torch.long), ids[:, None].float())


def test_reservoir_keeps_every_sample_with_probability_capacity_over_n():
    n, capacity, trials = 100, 10, 500
    kept = torch.zeros(n)
    for seed in range(trials):
        buffer = ReplayBuffer(capacity, seed=seed)
        for start in range(0, n, 10):
            offer(buffer, start, [0] * 10)
        assert len(buffer) == capacity
        kept[buffer.logits[:, 0].long()] += 1  # logits hold the sample ids
        assert len(set(buffer.logits[:, 0].tolist())) == capacity  # no sample stored twice
    assert kept.sum() == trials * capacity
    assert chisquare(kept.numpy()).pvalue > 1e-3  # uniform: each sample kept with probability capacity / n
    assert abs(kept[: n // 2].mean() / trials - capacity / n) < 0.01  # early samples are not favoured


def test_balanced_policy_evens_out_an_imbalanced_stream():
    buffer = ReplayBuffer(30, policy="balanced", seed=0)
    labels = [0] * 300 + [1] * 60 + [2] * 30  # class 0 floods the buffer first
    for start in range(0, len(labels), 15):
        offer(buffer, start, labels[start:start + 15])
    counts = torch.bincount(buffer.y, minlength=3).tolist()
    assert counts == [10, 10, 10]
    assert sorted(len(s) for s in buffer.slots.values()) == [10, 10, 10]
    reservoir = ReplayBuffer(30, seed=0)
    for start in range(0, len(labels), 15):
        offer(reservoir, start, labels[start:start + 15])
    assert torch.bincount(reservoir.y, minlength=3)[0] > 15  # plain reservoir follows the imbalance


@pytest.mark.parametrize("policy", ["reservoir", "balanced"])
def test_buffer_state_dict_round_trip_continues_identically(policy):
    a = ReplayBuffer(16, policy=policy, seed=1)
    for start in range(0, 60, 6):
        offer(a, start, [i % 3 for i in range(start, start + 6)])
    b = ReplayBuffer(16, policy=policy, seed=99)
    b.load_state_dict(a.state_dict())
    for buf in (a, b):
        offer(buf, 60, [0, 1, 2, 0, 1, 2])
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x", "y", "t", "logits"))
    assert a.x.dtype == torch.uint8
    assert all(torch.equal(u, v) for u, v in zip(a.sample(8), b.sample(8)))
    with pytest.raises(ValueError, match="capacity 16"):
        ReplayBuffer(8, policy=policy).load_state_dict(a.state_dict())


def test_metrics_on_a_hand_made_matrix():
    R = torch.tensor([[0.9, math.nan, math.nan], [0.6, 0.8, math.nan], [0.5, 0.7, 0.95]])
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert average_accuracy(R[:2, :2]) == pytest.approx(0.7)
    # forgetting: task 0 best 0.9 -> 0.5, task 1 best 0.8 -> 0.7
    assert average_forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    R2 = torch.tensor([[0.5, math.nan, math.nan], [0.7, 0.8, math.nan], [0.6, 0.9, 0.9]])  # best is not the diagonal
    assert average_forgetting(R2) == pytest.approx(((0.7 - 0.6) + (0.8 - 0.9)) / 2)
    assert backward_transfer(R2) == pytest.approx(((0.6 - 0.5) + (0.9 - 0.8)) / 2)
    assert average_forgetting(R[:1, :1]) == backward_transfer(R[:1, :1]) == 0.0


def attach(module, scenario: str = "class"):
    """A module with its stream, as after ``setup`` (no trainer)."""
    stream = ContinualDataModule(Digits(batch_size=16), scenario=scenario, classes_per_task=2)
    stream.setup("fit")
    module.stream = stream
    module.register_buffer("task_mask", torch.stack([torch.isin(torch.arange(10), torch.tensor(stream.task_labels(t))) for t in range(5)]), persistent=False)
    return stream


def first_batch(stream, task: int, n: int) -> Batch:
    return next(iter(torch.utils.data.DataLoader(stream.task_set("train", task), batch_size=n, collate_fn=stream.collate_fn)))


def test_derpp_loss_is_ce_plus_alpha_mse_plus_beta_ce():
    seed_everything(0)
    model = DERpp(**MLP, buffer_size=20, alpha=0.3, beta=0.7, replay_batch_size=5)
    stream = attach(model)
    batch = first_batch(stream, 0, 8)
    model.buffer.add(batch.raw, batch.targets, batch.task, torch.randn(8, 10))
    before = copy.deepcopy(model.buffer)
    loss, logits, y = model.training_loss(batch)
    model.buffer, after = before, model.buffer  # replay the same draws by hand
    x1, _, _, z1 = model.replay(5)
    x2, y2, _, _ = model.replay(5)
    expected = F.cross_entropy(model(batch.inputs), batch.targets) + 0.3 * F.mse_loss(model(x1), z1) + 0.7 * F.cross_entropy(model(x2), y2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (term,) = [t for t in model.losses if isinstance(t, DarkReplay)]  # DER++ is the base class plus one replay term
    assert (term.alpha, term.beta) == (0.3, 0.7) and [type(t) for t in model.losses] == [CrossEntropy, DarkReplay]
    assert len(after) == 16 and torch.equal(after.logits[8:16], logits.detach())  # current batch inserted, with its logits


def test_task_incremental_masks_logits_to_the_task():
    model = ER(**MLP, buffer_size=10)
    attach(model, scenario="task")
    logits = model.mask_logits(torch.zeros(2, 10), torch.tensor([0, 3]))
    assert logits.argmax(-1).tolist() == [0, 6] and (logits[1, 6:8] == 0).all() and (logits[1, :6] < -1e30).all()


def test_fpf_finetunes_only_the_forgetting_prone_modules():
    seed_everything(0)
    model = ER(**MLP, buffer_size=32, fpf_lr=0.1, fpf_num_modules=1)
    stream = attach(model)
    batch = first_batch(stream, 1, 32)
    model.buffer.add(batch.raw, batch.targets, batch.task, torch.zeros(32, 10))
    model.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.head.weight.add_(0.5)  # the head drifts most
    drift = module_drift(model, model.anchor)
    assert drift["head"] == pytest.approx(0.5 * 320 / 330) and drift["backbone.layers.1"] == 0
    assert model.forgetting_prone_modules() == ["head"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fpf(3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}
    model.hparams.fpf_modules = ["Linear"]  # by class name: every Linear
    assert model.forgetting_prone_modules() == ["backbone.layers.1", "backbone.layers.3", "head"]


def test_replay_methods_refuse_an_empty_buffer():
    for cls in (ER, DER, DERpp, KFPF):
        with pytest.raises(ValueError, match=f"buffer_size=0: {cls.__name__} .*buffer_size >= 1"):
            cls(**MLP, buffer_size=0)
    with pytest.raises(ValueError, match="fpf_steps=5"):
        FineTune(**MLP, fpf_steps=5)
    with pytest.raises(ValueError, match="'reservoirs'"):
        ER(**MLP, buffer_size=5, buffer_policy="reservoirs")
    trainer = Trainer(max_epochs=5, reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    with pytest.raises(ValueError, match="fpf_modules: 'bn' names no module"):
        trainer.fit(ER(**MLP, buffer_size=5, fpf_modules=["bn"]), ContinualDataModule(Digits(), classes_per_task=2))


def run_stream(cls, root, ckpt_path=None, **kwargs):
    seed_everything(0)
    model = cls(**{**MLP, "buffer_size": 40, "replay_batch_size": 8, **kwargs})
    stream = ContinualDataModule(Digits(batch_size=16), classes_per_task=2, epochs_per_task=2)
    trainer = Trainer(max_epochs=10, reload_dataloaders_every_n_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, callbacks=[ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")])
    trainer.fit(model, stream, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("cls,kwargs", [(DERpp, {"fpf_steps": 2}), (KFPF, {"fpf_every": 4, "fpf_steps": 2, "buffer_policy": "balanced"})],
                         ids=["derpp+fpf", "kfpf"])
def test_resume_mid_task_3_finishes_like_an_uninterrupted_stream(cls, kwargs, tmp_path):
    full = run_stream(cls, tmp_path / "full", **kwargs)
    assert not torch.isnan(full.acc_matrix.tril()).any() and full.tasks_finished == 5
    resumed = run_stream(cls, tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=4.ckpt", **kwargs)  # task 3 of 5, epoch 1 of 2
    assert torch.equal(full.acc_matrix.nan_to_num(-1), resumed.acc_matrix.nan_to_num(-1))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert full.buffer.seen == resumed.buffer.seen and torch.equal(full.buffer.x, resumed.buffer.x) and torch.equal(full.buffer.logits, resumed.buffer.logits)
    assert full.drift == resumed.drift


def test_ddp_each_rank_keeps_its_share_and_the_checkpoint_keeps_all(tmp_path):
    args = ["--model=zoo.continual.ER", "--model.model=zoo/mlp", f"--model.model_kwargs={json.dumps(MLP['model_kwargs'])}", "--model.buffer_size=40",
            "--model.fpf_steps=2", "--model.replay_batch_size=8", "--data=datamodules.continual.ContinualDataModule", "--data.data=datamodules.Digits",
            "--data.data.batch_size=16", "--data.classes_per_task=2", "--trainer.max_epochs=5", "--trainer.reload_dataloaders_every_n_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--seed_everything=0"]
    states = run_ddp(args, tmp_path / "ranks", cwd=tmp_path)
    for key, value in states[0]["state_dict"].items():
        assert torch.equal(value, states[1]["state_dict"][key]), key  # FPF gradients and BN stats are synced too
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=False)
    shares = ckpt["continual"]["buffer_shares"]
    assert len(shares) == 2 and [s["capacity"] for s in shares] == [20, 20] and [s["size"] for s in shares] == [20, 20]
    assert [s["seen"] for s in shares] == [5 * 3 * 16] * 2  # 5 tasks x 3 steps x 16 samples on each rank
    assert not torch.equal(shares[0]["stored"]["x"], shares[1]["stored"]["x"])  # each rank buffered its own shard
    assert not torch.isnan(ckpt["continual"]["acc_matrix"][:4].tril()).any()


def test_kfpf_kd_step_is_sgd_on_ce_plus_alpha_logit_mse_of_the_head_only():
    seed_everything(0)
    model = KFPF(**MLP, buffer_size=32, replay_batch_size=6, fpf_lr=0.05, fpf_alpha=0.5, fpf_modules=["head"])
    stream = attach(model)
    batch = first_batch(stream, 0, 16)
    model.buffer.add(batch.raw, batch.targets, batch.task, torch.randn(16, 10) * 3)  # stored logits (k-FPF-KD's targets)
    before, params = copy.deepcopy(model.buffer), {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fpf(1)
    model.buffer, after = before, {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y, _, z = model.replay(6)  # the same draw, by hand
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    out = model(x)
    loss = F.cross_entropy(out, y) + 0.5 * F.mse_loss(out, z)
    gw, gb = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
    assert torch.allclose(after["head.weight"], params["head.weight"] - 0.05 * gw, atol=1e-6)
    assert torch.allclose(after["head.bias"], params["head.bias"] - 0.05 * gb, atol=1e-6)
    assert all(torch.equal(after[n], params[n]) for n in params if not n.startswith("head."))  # the backbone is frozen during FPF


def test_fpf_with_a_diverging_lr_stops_with_a_clear_error():
    seed_everything(0)
    model = KFPF(**MLP, buffer_size=32, fpf_lr=1e6, fpf_alpha=1.0, fpf_modules=["head"])  # the logit MSE blows up
    stream = attach(model)
    batch = first_batch(stream, 0, 16)
    model.buffer.add(batch.raw, batch.targets, batch.task, torch.zeros(16, 10))
    with pytest.raises(FloatingPointError, match=r"modules \['head'\]: fpf_lr=1000000.0 is too large"):
        model.fpf(50)


def test_er_is_the_base_class_plus_a_replay_term_logged_by_name(tmp_path):
    """ER == ContinualClassifier with losses [CrossEntropy, ExperienceReplay]: the same loss on the same buffer state."""
    seed_everything(0)
    er = ER(**MLP, buffer_size=20, replay_batch_size=5)
    parts = ContinualClassifier(**MLP, buffer_size=20, replay_batch_size=5, losses=[CrossEntropy(), ExperienceReplay(batch_size=5)])
    parts.load_state_dict(er.state_dict())
    for model in (er, parts):
        stream = attach(model)
    batch = first_batch(stream, 0, 8)
    for model in (er, parts):
        model.buffer.add(batch.raw, batch.targets, batch.task, torch.zeros(8, 10))
    assert er.training_loss(batch)[0].item() == parts.training_loss(batch)[0].item()
    assert parts.hparams.losses[1] == {"class_path": "zoo.continual.replay.ExperienceReplay", "init_args": {"weight": 1.0, "batch_size": 5, "replace": False,
                                                                                                           "combine": "concat", "name": "experience_replay"}}
    trainer = Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ER(**MLP, buffer_size=20), ContinualDataModule(Digits(batch_size=16), classes_per_task=2))
    assert {"train/cross_entropy", "train/experience_replay"} <= set(trainer.logged_metrics)


def test_replay_terms_need_a_continual_module_with_a_buffer():
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="'experience_replay' .* replays the buffer of a zoo.continual.ContinualClassifier .* Classifier has none"):
        trainer.fit(Classifier(**MLP, losses=[CrossEntropy(), ExperienceReplay()]), Digits(batch_size=16))
    with pytest.raises(ValueError, match="buffer_size=0: ContinualClassifier replays from a buffer"):
        ContinualClassifier(**MLP, losses=[CrossEntropy(), DarkReplay(alpha=0.1)])
    with pytest.raises(ValueError, match="ContinualMetrics reads the accuracy matrix .* Classifier keeps none"):
        Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[ContinualMetrics()]).fit(Classifier(**MLP), Digits(batch_size=16))


def test_joint_needs_a_cumulative_stream(tmp_path):
    kw = dict(max_epochs=5, reload_dataloaders_every_n_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="set data.init_args.cumulative: true"):
        Trainer(**kw).fit(Joint(**MLP), ContinualDataModule(Digits(batch_size=16), classes_per_task=2))
    seen = []

    class Tasks(ContinualMetrics):  # the task ends are announced to callbacks, with the matrix row filled
        def on_task_end(self, trainer, pl_module, task, final):
            seen.append((task, final, int(pl_module.acc_matrix[task].isnan().sum())))

    stream = ContinualDataModule(Digits(batch_size=16), classes_per_task=2, cumulative=True)
    Trainer(**kw, callbacks=[Tasks()]).fit(Joint(**MLP), stream)
    assert seen == [(t, t == 4, 4 - t) for t in range(5)]


@pytest.mark.parametrize("limits", [{"max_epochs": 2}, {"max_epochs": 5, "max_steps": 4}], ids=["stream_end", "max_steps_mid_epoch"])
def test_last_ckpt_is_the_final_state_with_the_final_task_end_and_fpf(limits, tmp_path):
    """The final task end (drift, FPF, accuracy row) happens before any checkpoint callback writes its last
    epoch-end / train-end ``last.ckpt``: both ours and Lightning's hold the module's state after ``fit``."""
    seed_everything(0)
    model = KFPF(**MLP, buffer_size=40, replay_batch_size=8, fpf_every=1000, fpf_steps=3)
    stream = ContinualDataModule(Digits(batch_size=16), classes_per_task=2)
    callbacks = [Checkpoint(dirpath=tmp_path / "zoo", every_n_epochs=1), ModelCheckpoint(dirpath=tmp_path / "pl", save_last=True, every_n_epochs=1)]
    trainer = Trainer(**limits, reload_dataloaders_every_n_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    before = {}
    fpf = model.fpf
    model.fpf = lambda steps: (before.update({model.tasks_finished: copy.deepcopy(model.state_dict())}), fpf(steps))
    trainer.fit(model, stream)
    assert model.tasks_finished == 2 and not torch.isnan(model.acc_matrix[1, :2]).any()
    assert any(not torch.equal(before[1][k], v) for k, v in model.state_dict().items())  # the final FPF changed the weights
    for path in (tmp_path / "zoo" / "last.ckpt", tmp_path / "pl" / "last.ckpt"):
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["global_step"] == trainer.global_step and ckpt["continual"]["tasks_finished"] == 2, path
        assert torch.equal(ckpt["continual"]["acc_matrix"].nan_to_num(-1), model.acc_matrix.nan_to_num(-1)), path
        assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in model.state_dict().items()), path
