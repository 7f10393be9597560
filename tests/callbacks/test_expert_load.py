"""ExpertLoad: the logged per-expert loads equal routing counted by hand; the heatmap reaches TensorBoard."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.expert_load import ExpertLoad
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.classifier import Classifier
from zoo.batch import Batch, collate
from zoo.emoe import EMoEModule


def test_expert_load_matches_hand_counted_routing_and_draws_heatmap(tmp_path):
    torch.manual_seed(0)
    module = EMoEModule(TINY_VIT, num_classes=10, pretrained=False, model_kwargs=TINY_VIT_KWARGS, num_experts=8, top_k=2,
                        layers=["*"], gate_noise=0.0,
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.0))  # frozen: routing is the same every step
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    loader = DataLoader([Batch(x[i], y[i]) for i in range(12)], batch_size=6, collate_fn=collate)  # named batches, as zoo datamodules give
    expected, last = {}, {}

    def count(layer_name):
        def hook(layer, args, _out):
            tokens = args[0].reshape(-1, args[0].shape[-1])
            idx = (tokens @ layer.fc1_weight.detach().mean(1).t()).topk(2).indices
            last[layer_name] = torch.bincount(idx.reshape(-1), minlength=8)
            expected[layer_name] = expected.get(layer_name, 0) + last[layer_name]
        return hook

    class Count(Callback):  # the Trainer makes the EMoE layers (the module's surgery, in configure_model): hook them then
        def on_fit_start(self, trainer, pl_module):
            for name, layer in pl_module.emoe_layers():
                layer.register_forward_hook(count(f"backbone.{name}"))

    callback = ExpertLoad(log_every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, callbacks=[callback, Count()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert expected, "the EMoE layers made by the Trainer ran"
    loads = callback.loads()
    assert list(loads) == ["backbone.blocks.0.mlp", "backbone.blocks.1.mlp"]
    for name, share in loads.items():
        torch.testing.assert_close(share, expected[name].double() / expected[name].sum())
        # the scalars cover the tokens since the previous log: here the last step
        assert trainer.callback_metrics[f"expert_load/{name}/max"] == pytest.approx((last[name].max() / last[name].sum() * 8).item(), rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert "expert_load/heatmap" in events.Tags()["images"]
    assert "expert_load/backbone.blocks.0.mlp/max" in events.Tags()["scalars"]


def test_expert_load_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="log_every_n_steps=0"):
        ExpertLoad(log_every_n_steps=0)
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[ExpertLoad()], enable_checkpointing=False, default_root_dir=tmp_path)
    loader = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), batch_size=4)  # a plain (inputs, targets) pair works too
    with pytest.raises(ValueError, match="has no EMoE layer"):
        trainer.fit(Classifier(TINY_VIT, model_kwargs=TINY_VIT_KWARGS), loader)
