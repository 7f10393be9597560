"""A strategy a module cannot train under fails before training, naming the module, the part and what works
(zoo.sharding.check_strategy / check_accelerator), and the trainer snippets in configs/strategies/ build a Trainer
with any technique's config (their CPU one runs for real, 2 processes, in tests/test_gpu_check.py).

DeepSpeed is not installed here: a stand-in strategy class named ``DeepSpeedStrategy`` with a ZeRO ``config`` (what
``zoo.sharding.is_sharding`` reads) stands in for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

import cli
from tests.helpers import ROOT, TINY_VIT, TINY_VIT_KWARGS
from zoo import sharding
from zoo.classifier import Classifier
from zoo.subtuning import Freeze

STRATEGIES = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Trains on one CPU like SingleDeviceStrategy; its class name and ZeRO config are DeepSpeed's."""

    def __init__(self, stage: int):
        super().__init__(device="cpu")
        self.config = {"zero_optimization": {"stage": stage}}


class WholeWeights:
    """A part (e.g. a callback) that declares it needs whole parameters."""

    sharding = "it reads every weight matrix whole"


class Calls(Callback):
    """Records the hooks reached, to check a refusal happened before training."""

    def __init__(self):
        self.seen: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen.append("train_start")

    def on_train_batch_start(self, *args) -> None:
        self.seen.append("batch")


def frozen_vit() -> Classifier:
    return Classifier(model=TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS, surgery=[Freeze(trainable_layers=[-1])])


def test_deepspeed_stage3_refuses_surgery_before_training():
    calls = Calls()
    trainer = Trainer(strategy=DeepSpeedStrategy(stage=3), accelerator="cpu", devices=1, max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[calls])
    with pytest.raises(ValueError) as info:
        trainer.fit(frozen_vit(), train_dataloaders=loader())
    message = str(info.value)
    assert message.startswith("Classifier: Freeze cannot train under DeepSpeedStrategy (ZeRO stage 3)"), message
    assert "DDP" in message and "DeepSpeed stages 1-2" in message
    assert calls.seen == []  # refused in setup: no training started


def loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def test_deepspeed_stage2_and_model_parallel_accept_surgery():
    module = frozen_vit()
    sharding.check_strategy(module, DeepSpeedStrategy(stage=2), list(module.surgery))  # whole parameters: fine
    sharding.check_strategy(module, DDPStrategy(), [*module.surgery, WholeWeights()])  # not sharding: every part fine
    if getattr(module.surgery[0], "sharding", None) is None:  # Freeze works on FSDP2 shards unless it says otherwise
        sharding.check_strategy(module, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), list(module.surgery))


@pytest.mark.parametrize("strategy", [ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), DeepSpeedStrategy(stage=3)],
                         ids=["fsdp2", "zero3"])
def test_a_part_needing_whole_parameters_is_refused_under_sharding(strategy):
    module = Classifier(model=TINY_VIT, num_classes=10, model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(ValueError) as info:
        sharding.check_strategy(module, strategy, [*module.losses, WholeWeights()])
    message = str(info.value)
    assert message.startswith(f"Classifier: WholeWeights cannot train under {sharding.describe(strategy)} (it reads every weight matrix whole)")
    assert "Strategies that work: single device, DDP" in message and "ModelParallelStrategy" not in message.split("work:")[1]


class Mesh:
    """Lightning's 2-D mesh as ``zoo.sharding`` reads it (dimension names, sizes)."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, data: int, tensor: int):
        self.sizes = {"data_parallel": data, "tensor_parallel": tensor}

    def __getitem__(self, name: str):
        return type("Dim", (), {"size": lambda _, n=self.sizes[name]: n})()


def test_tensor_parallel_is_refused_naming_the_module():
    module = frozen_vit()
    with pytest.raises(ValueError) as info:
        sharding.data_parallel_mesh(Mesh(1, 2), module)
    message = str(info.value)
    assert message.startswith("Classifier: the zoo shards every block whole") and "tensor_parallel_size=2" in message
    assert "tensor_parallel_size=1" in message and "configs/strategies/sharded_cpu.yaml" in message
    assert sharding.tensor_parallel_size(module, Mesh(2, 1)) == 1


@pytest.mark.parametrize("strategy", [FSDPStrategy(), "fsdp", "fsdp_cpu_offload", "lightning.pytorch.strategies.FSDPStrategy"],
                         ids=["instance", "fsdp", "fsdp_cpu_offload", "class_name"])
def test_fsdp1_on_cpu_names_the_module_and_what_works(strategy):
    module = frozen_vit()
    for accelerator in ("cpu", "auto"):
        with pytest.raises(ValueError) as info:
            sharding.check_accelerator(module, strategy, accelerator)
        message = str(info.value)
        assert message.startswith(f"Classifier: FSDPStrategy (FSDP1) runs on CUDA GPUs only (accelerator='{accelerator}')"), message
        assert "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)" in message and "sharded_cpu.yaml" in message
    sharding.check_accelerator(module, strategy, "gpu")
    sharding.check_accelerator(module, ModelParallelStrategy(), "cpu")
    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # what Lightning says on its own (no module named)
        Trainer(strategy="fsdp", accelerator="cpu", devices=1)


@pytest.mark.parametrize("snippet", STRATEGIES, ids=[p.name for p in STRATEGIES])
def test_strategy_snippet_builds_a_trainer_with_a_technique_config(snippet: Path, tmp_path, monkeypatch):
    """``zoo fit --config <technique> --config configs/strategies/<snippet>`` parses and builds its Trainer (on CPU here)."""
    conf = yaml.safe_load(snippet.read_text())["trainer"]
    assert set(yaml.safe_load(snippet.read_text())) == {"trainer"}  # a snippet: trainer keys only
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        run = cli.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(snippet), "--trainer.accelerator=cpu",
                        "--trainer.logger=false"], run=False)
    finally:
        torch.set_num_threads(threads)
    trainer = run.trainer
    assert trainer.num_nodes == conf["num_nodes"]
    assert trainer.precision == conf.get("precision", "32-true")
    if isinstance(conf["strategy"], dict):
        assert isinstance(trainer.strategy, ModelParallelStrategy)
        sizes = conf["strategy"]["init_args"]
        assert sizes["tensor_parallel_size"] == 1 and sizes["data_parallel_size"] == conf["devices"] * conf["num_nodes"]
        assert trainer.num_devices == conf["devices"]
    else:
        assert isinstance(trainer.strategy, DDPStrategy)
    assert conf["accelerator"] == ("cpu" if "cpu" in snippet.name else "gpu")


def test_cli_names_the_module_for_fsdp1_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^Classifier: FSDPStrategy \(FSDP1\) runs on CUDA GPUs only"):
        cli.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.strategy=fsdp", "--trainer.logger=false"], run=False)
