"""zoo.reshard: a checkpoint moves between the unsharded and the sharded layout (optimizer states by position / by
name, trained-only adapter states made whole), checked against torch's own full optimizer state dict; the CLI's
check refuses a checkpoint the strategy cannot read, before training. The sharded side (a real ModelParallelStrategy
folder converted and converted back) is in tests/test_sharding.py."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, fit_and_save
from zoo import reshard
from zoo.adapters import LoRA
from zoo.adapters.checkpoint import holds_trained_only
from zoo.backbones import load_zoo_module
from zoo.classifier import Classifier


def same(a, b) -> bool:
    """Nested containers equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def classifier(**kw):
    torch.manual_seed(0)
    return Classifier(model=TINY_VIT, num_classes=4, model_kwargs={**TINY_VIT_KWARGS, "depth": 3}, **kw)


def test_unsharded_checkpoints_key_optimizer_states_as_torchs_full_state_dict_and_convert_to_positions(tmp_path):
    """An unsharded run's checkpoint holds the optimizer states by name (Classifier.on_save_checkpoint), exactly torch's
    full optimizer state dict, which the sharded loader reads; ``--to plain`` gives ``optimizer.state_dict()`` back,
    and ``--to sharded`` of a position-keyed file (an older checkpoint) gives the names again."""
    module = classifier()
    trainer = fit_and_save(module, tmp_path / "run.ckpt")
    reference = get_optimizer_state_dict(module, trainer.optimizers[0], options=StateDictOptions(full_state_dict=True))
    saved = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert len(saved["optimizer_states"][0]["state"]) > 10 and reshard.optimizer_layout(saved) == "sharded"
    assert same(saved["optimizer_states"][0], reference)

    reshard.convert(tmp_path / "run.ckpt", tmp_path / "plain.ckpt", "plain")
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    assert same(plain["optimizer_states"][0], trainer.optimizers[0].state_dict())  # torch's own positions
    assert same(plain["state_dict"], saved["state_dict"]) and same(plain["loops"], saved["loops"])

    reshard.convert(tmp_path / "plain.ckpt", tmp_path / "sharded.ckpt", "sharded")
    assert same(torch.load(tmp_path / "sharded.ckpt", weights_only=False)["optimizer_states"][0], reference)


def test_trained_only_adapter_state_is_made_whole_and_a_different_base_is_refused(tmp_path):
    base = classifier()
    fit_and_save(base, tmp_path / "base.ckpt", steps=1)
    module = Classifier(model=str(tmp_path / "base.ckpt"), num_classes=4, surgery=[LoRA(parts=["attention", "ffn"], r=2)])
    fit_and_save(module, tmp_path / "adapted.ckpt")
    assert holds_trained_only(torch.load(tmp_path / "adapted.ckpt", weights_only=False)["state_dict"])
    reshard.convert(tmp_path / "adapted.ckpt", tmp_path / "sharded.ckpt", "sharded")
    state = torch.load(tmp_path / "sharded.ckpt", weights_only=False)["state_dict"]
    params = dict(module.named_parameters())
    assert not holds_trained_only(state) and all(torch.equal(state[n], p) for n, p in params.items())
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(load_zoo_module(tmp_path / "sharded.ckpt").eval()(x), module.eval()(x))  # strict: every key there

    with torch.no_grad():  # the base changes after the adapter run: its fingerprint no longer matches
        checkpoint = torch.load(tmp_path / "base.ckpt", weights_only=False)
        next(iter(v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone."))).add_(1.0)
        torch.save(checkpoint, tmp_path / "base.ckpt")
    with pytest.raises(ValueError, match="adapted.ckpt: the adapter run's base, rebuilt from the module's hyperparameters, differs"):
        reshard.convert(tmp_path / "adapted.ckpt", tmp_path / "again.ckpt", "sharded")


def test_the_cli_check_refuses_what_the_strategy_cannot_read_naming_the_command(tmp_path):
    module = classifier(surgery=[LoRA(parts=["ffn"], r=2)])
    fit_and_save(module, tmp_path / "adapted.ckpt")
    fit_and_save(classifier(), tmp_path / "plain.ckpt")
    folder = tmp_path / "sharded_run.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")
    (folder / ".metadata").write_bytes(b"")
    sharded, ddp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), DDPStrategy()

    def refused(path, strategy, to):
        with pytest.raises(ValueError, match=rf"--ckpt_path '{path}'.*python -m zoo\.reshard {path} \S+_{to}\.ckpt --to {to}"):
            reshard.check_checkpoint(str(path), strategy)

    refused(tmp_path / "adapted.ckpt", sharded, "sharded")  # the base is missing
    refused(folder, ddp, "plain")
    refused(folder, SingleDeviceStrategy("cpu"), "plain")  # `zoo test` on one device
    reshard.check_checkpoint(str(folder), sharded)
    reshard.check_checkpoint(str(tmp_path / "plain.ckpt"), ddp)
    reshard.check_checkpoint(str(tmp_path / "adapted.ckpt"), ddp)
    reshard.convert(tmp_path / "adapted.ckpt", tmp_path / "converted.ckpt", "sharded", seed=0)  # a random base: the run's seed
    reshard.check_checkpoint(str(tmp_path / "converted.ckpt"), sharded)
    reshard.check_checkpoint(str(tmp_path / "converted.ckpt"), ddp)  # torch matches name-keyed states by order
    for name in ("last", "best", None):
        reshard.check_checkpoint(name, sharded)
    with pytest.raises(ValueError, match=r"to='whole': expected one of \('sharded', 'plain'\)"):
        reshard.convert(tmp_path / "plain.ckpt", tmp_path / "x.ckpt", "whole")


def test_the_zoo_command_refuses_it_when_the_trainer_is_built(tmp_path):
    """Before any process starts: a trained-only adapter file with ModelParallelStrategy on 2 CPU processes."""
    import json

    import cli

    base = classifier()
    fit_and_save(base, tmp_path / "base.ckpt", steps=1)
    fit_and_save(Classifier(model=str(tmp_path / "base.ckpt"), num_classes=4, surgery=[LoRA(parts=["ffn"], r=2)]), tmp_path / "adapted.ckpt")
    model = {"class_path": "zoo.Classifier", "init_args": {"model": str(tmp_path / "base.ckpt"), "surgery": [
        {"class_path": "zoo.adapters.LoRA", "init_args": {"parts": ["ffn"], "r": 2}}]}}
    args = ["fit", f"--model={json.dumps(model)}", "--data=datamodules.Digits", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy", "--trainer.strategy.init_args.data_parallel_size=2",
            "--trainer.strategy.init_args.tensor_parallel_size=1", "--trainer.logger=false", f"--ckpt_path={tmp_path / 'adapted.ckpt'}"]
    with pytest.raises(ValueError, match=r"adapted\.ckpt' holds only the trained parameters of an adapter run.*--to sharded"):
        cli.main(args)


def test_an_unsharded_run_resumes_sharded_as_it_is(tmp_path):
    """One process, then 2 sharded processes from its last.ckpt (no conversion): the optimizer states are taken up
    (Adam's step count runs on, 2 then 4)."""
    from tests.helpers import ROOT, run_cli

    common = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    sharded = ["--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
               "--trainer.strategy.init_args.data_parallel_size=2", "--trainer.strategy.init_args.tensor_parallel_size=1",
               "--trainer.strategy.init_args.save_distributed_checkpoint=false", "--trainer.strategy.init_args.timeout=0:01:00"]
    env = {"OMP_NUM_THREADS": "1"}
    run_cli([*common, "--trainer.max_epochs=1", f"--checkpoint.dirpath={tmp_path / 'one'}"], cwd=tmp_path, env=env)
    run_cli([*common, *sharded, "--trainer.max_epochs=2", f"--checkpoint.dirpath={tmp_path / 'two'}",
             f"--ckpt_path={tmp_path / 'one' / 'last.ckpt'}"], cwd=tmp_path, env=env)
    for run, step in (("one", 2), ("two", 4)):
        saved = torch.load(tmp_path / run / "last.ckpt", weights_only=False)
        steps = {float(s["step"]) for s in saved["optimizer_states"][0]["state"].values()}
        assert saved["global_step"] == step and steps == {float(step)}, (run, saved["global_step"], steps)
