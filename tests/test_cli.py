import importlib
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import cli
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_cli, run_ddp

MODEL = {"class_path": "zoo.Classifier", "init_args": {"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS}}
DATA = {"class_path": "datamodules.Digits", "init_args": {"batch_size": 32}}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


def write(path: Path, conf: dict) -> str:
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def test_help_lists_the_zoo(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "zoo.Classifier" in out and "datamodules.Digits" in out and "datamodules.TextClassification" in out
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "known subclasses" in out and "datamodules.FashionMNIST" in out


def test_configs_compose_and_short_names(tmp_path):
    model_yaml = write(tmp_path / "model.yaml", {"model": MODEL})
    data_yaml = write(tmp_path / "data.yaml", {"data": DATA})
    run = cli.main(["--config", data_yaml, "--config", model_yaml, "--model.init_args.label_smoothing=0.1"], run=False)
    assert type(run.model).__name__ == "Classifier" and run.model.num_classes == 10  # linked from the datamodule
    assert run.model.criterion.label_smoothing == 0.1 and run.datamodule.batch_size == 32
    run = cli.main(["--model=zoo.Classifier", "--model.model=zoo/mlp", "--data=datamodules.Digits",
                    '--model.model_kwargs={"in_chans": 1, "img_size": 8}',
                    "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.3"], run=False)
    assert run.model.hparams.model == "zoo/mlp"
    assert isinstance(run.model.configure_optimizers(), torch.optim.SGD) and run.model.configure_optimizers().defaults["lr"] == 0.3


def test_end_to_end_subprocess_saves_config_next_to_checkpoints(tmp_path):
    conf = {"trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2}, "model": MODEL, "data": DATA}
    proc = run_cli(["fit", "--config", write(tmp_path / "tiny.yaml", conf), *QUIET], cwd=tmp_path)
    assert "checkpoint:" in proc.stdout and "tensorboard --logdir runs" in proc.stdout
    run_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["model"] == TINY_VIT and saved["data"]["class_path"] == "datamodules.Digits"
    assert list((run_dir / "checkpoints").glob("*.ckpt")) and list(run_dir.glob("events.out.tfevents.*"))


class RecordStart(Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.start_step = trainer.global_step
        pl_module.start_state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_resume_continues_from_the_saved_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = write(tmp_path / "c.yaml", {"trainer": {"limit_train_batches": 4, "limit_val_batches": 1, "logger": False}, "model": MODEL, "data": DATA})
    args = ["fit", "--config", conf, *QUIET, "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=tests.test_cli.RecordStart"]
    first = cli.main([*args, "--trainer.max_epochs=1"])
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")  # no monitor: last.ckpt is the one checkpoint
    assert ckpt.name == "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)  # the second run rewrites last.ckpt in the same folder
    second = cli.main([*args, "--trainer.max_epochs=2", "--ckpt_path", str(ckpt)])
    assert first.trainer.global_step == 4 and second.model.start_step == 4 and second.trainer.global_step == 8
    assert torch.load(ckpt, weights_only=False)["global_step"] == 8  # last.ckpt now holds the resumed run's final state
    assert saved["zoo_class"] == "zoo.classifier.Classifier"
    for k, v in saved["state_dict"].items():
        assert torch.equal(second.model.start_state[k], v), k
    assert second.trainer.optimizers[0].state_dict()["state"]  # optimizer moments restored, not fresh


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    args = ["--model=zoo.Classifier", f"--model.model={TINY_VIT}", f"--model.model_kwargs={json.dumps(TINY_VIT_KWARGS)}", "--data=datamodules.Digits",
            "--seed_everything=0", "--trainer.max_steps=4", "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"]
    rank0, rank1 = run_ddp(args, tmp_path / "out", cwd=tmp_path)
    assert rank0["global_step"] == rank1["global_step"] == 4
    for k, v in rank0["state_dict"].items():
        assert torch.equal(v, rank1["state_dict"][k]), k
    init = cli.main(args[:5], run=False).model.state_dict()
    assert not torch.equal(init["head.weight"], rank0["state_dict"]["head.weight"])


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="Closest valid names: timm/vit_tiny_patch16_224"):
        cli.main(["--model=zoo.Classifier", "--model.model=timm/vit_tiny_patch16_22", "--data=datamodules.Digits"], run=False)
    run = cli.main(["--model=zoo.Classifier", "--model.model=zoo/mlp", "--data=datamodules.MNIST", f"--data.data_dir={tmp_path}/none",
                    "--data.download=false", "--trainer.logger=false"], run=False)
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        run.trainer.fit(run.model, run.datamodule)
    assert run.trainer.global_step == 0


def test_console_script_exits_with_status_0(tmp_path, monkeypatch):
    target = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]["zoo"]
    module, name = target.split(":")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["zoo", "fit", "--model=zoo.Classifier", "--model.model=zoo/mlp", "--data=datamodules.Digits",
                                      '--model.model_kwargs={"in_chans": 1, "img_size": 8}', "--trainer.fast_dev_run=true", "--trainer.logger=false", *QUIET])
    with pytest.raises(SystemExit) as exit_:
        sys.exit(getattr(importlib.import_module(module), name)())  # what the installed wrapper does
    assert exit_.value.code in (None, 0)
