"""What a run leaves behind and prints: last.ckpt is the final state, the summary, named callbacks, short errors,
thread defaults, no stray folders or warnings (issue 14)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import cli
from callbacks.checkpoint import Checkpoint
from callbacks.pruning import MagnitudePruning
from tests.helpers import ROOT, TINY_VIT, TINY_VIT_KWARGS
from zoo import runtime

MODEL = {"class_path": "zoo.Classifier", "init_args": {"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS}}
DATA = {"class_path": "datamodules.Digits", "init_args": {"batch_size": 32}}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def write(path: Path, conf: dict) -> str:
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def zoo(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "ZOO_TRACEBACK"}
    full_env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def test_last_ckpt_is_the_final_state_even_without_a_new_best(tmp_path, monkeypatch, capsys):
    """Lightning 2.6 rewrites last.ckpt only on a new best; a run stopped by max_steps mid-epoch saved nothing."""
    monkeypatch.chdir(tmp_path)
    # val/acc with mode=min: later epochs are (almost surely) no new best, which is what made last.ckpt stale.
    conf = write(tmp_path / "c.yaml", {"trainer": {"max_steps": 11, "limit_train_batches": 4, "limit_val_batches": 2},
                                       "checkpoint": {"monitor": "val/acc", "mode": "min"}, "model": MODEL, "data": DATA})
    run = cli.main(["fit", "--config", conf, *QUIET])
    ckpt = run.trainer.checkpoint_callback
    assert isinstance(ckpt, Checkpoint) and run.trainer.global_step == 11  # stopped mid-epoch (epoch 2, batch 3 of 4)
    last = torch.load(ckpt.last_model_path, weights_only=False)
    assert last["global_step"] == 11
    final = run.model.state_dict()
    assert last["state_dict"].keys() == final.keys()
    for k, v in last["state_dict"].items():
        assert torch.equal(v, final[k]), k
    best = torch.load(ckpt.best_model_path, weights_only=False)
    assert best["global_step"] < 11  # the best file is a different, earlier state
    out = capsys.readouterr().out
    assert f"checkpoint:  {ckpt.last_model_path}" in out and "best:" in out and "val: acc " in out


def test_resumed_run_reports_its_own_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = {"class_path": "zoo.Classifier", "init_args": {**MODEL["init_args"], "scheduler_interval": "step",
             "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
             "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 2, "gamma": 0.5}}}}
    conf = write(tmp_path / "c.yaml", {"trainer": {"limit_train_batches": 3, "limit_val_batches": 1},
                                       "checkpoint": {"monitor": "val/acc", "mode": "min"}, "model": model, "data": DATA})
    first = cli.main(["fit", "--config", conf, *QUIET, "--trainer.max_epochs=1"])
    killed_dir = Path(first.trainer.logger.log_dir)
    capsys.readouterr()
    second = cli.main(["fit", "--config", conf, *QUIET, "--trainer.max_epochs=3", "--ckpt_path", str(killed_dir / "checkpoints" / "last.ckpt")])
    out = capsys.readouterr().out
    new_dir = Path(second.trainer.logger.log_dir)
    assert new_dir != killed_dir
    (line,) = [l for l in out.splitlines() if l.startswith("checkpoint:")]
    assert str(new_dir / "checkpoints" / "last.ckpt") in line and "step 9" in line
    # The resumed run trains with the run's optimizer and LR schedule, not LightningCLI's defaults (Lightning #20801).
    (optimizer,) = second.trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    (schedule,) = second.trainer.lr_scheduler_configs
    assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.StepLR) and schedule.scheduler.last_epoch == 9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 4)
    best = [l for l in out.splitlines() if l.startswith("best:")]
    assert best and (str(killed_dir) not in best[0] or "from the run this one resumed" in best[0])


def test_continual_summary_shows_the_stream_beside_the_current_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    conf = {"trainer": {"max_epochs": 2, "limit_train_batches": 3, "logger": False, "reload_dataloaders_every_n_epochs": 1},
            "model": {"class_path": "zoo.continual.ER", "init_args": {"model": "zoo/mlp", "model_kwargs": {"in_chans": 1, "img_size": 8}, "buffer_size": 20}},
            "data": {"class_path": "datamodules.continual.ContinualDataModule",
                     "init_args": {"data": DATA, "scenario": "class", "classes_per_task": 5, "epochs_per_task": 1}}}
    run = cli.main(["fit", "--config", write(tmp_path / "c.yaml", conf), *QUIET])
    out = capsys.readouterr().out
    assert "val (current task 1 only): acc " in out
    from callbacks.continual_metrics import stream_metrics

    expected = stream_metrics(run.model.acc_matrix[:2, :2])["avg_acc"]
    assert f"stream after 2 task(s) (test split): average accuracy {expected:.4f}" in out


def test_named_callbacks_change_one_argument_from_the_command_line(tmp_path):
    config = str(ROOT / "configs" / "pruning" / "vit_fmnist_gradual.yaml")
    run = cli.main(["--config", config, "--trainer.logger=false", "--checkpoint.monitor=val/loss", "--checkpoint.mode=min",
                    "--callbacks.pruning.init_args.schedule.init_args.final_sparsity=0.5"], run=False)
    (pruning,) = [c for c in run.trainer.callbacks if isinstance(c, MagnitudePruning)]
    (ckpt,) = [c for c in run.trainer.callbacks if isinstance(c, Checkpoint)]
    assert pruning.schedule.final_sparsity == 0.5 and not pruning.global_pruning  # the rest of the callback as in the YAML (per layer)
    assert ckpt.monitor == "val/loss" and ckpt.mode == "min"
    # A second config changes one value of one named callback and keeps everything else.
    override = write(tmp_path / "o.yaml", {"checkpoint": {"monitor": "val/acc_top5"}})
    run = cli.main(["--config", config, "--config", override, "--trainer.logger=false"], run=False)
    (ckpt,) = [c for c in run.trainer.callbacks if isinstance(c, Checkpoint)]
    assert ckpt.monitor == "val/acc_top5" and ckpt.mode == "max"
    assert any(isinstance(c, MagnitudePruning) for c in run.trainer.callbacks)


def test_configs_write_only_under_runs():
    """Every shipped config keeps its files in its run folder: no checkpoint dirpath, loggers under runs/."""
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        conf = yaml.safe_load(path.read_text())
        trainer = conf.get("trainer") or {}
        assert not any(c.get("class_path", "").endswith("ModelCheckpoint") for c in trainer.get("callbacks") or []), path
        assert "dirpath" not in (conf.get("checkpoint") or {}), path
        logger = trainer.get("logger")
        if isinstance(logger, dict):
            assert logger["init_args"]["save_dir"] == "runs", path
        assert "cache_dir" not in ((conf.get("model") or {}).get("init_args") or {}), path


def test_thread_defaults_share_the_idle_cores(monkeypatch):
    assert runtime.default_threads(1, cores=2, load=0.0) == 2
    assert runtime.default_threads(2, cores=2, load=0.0) == 1  # 2 DDP processes on 2 cores
    assert runtime.default_threads(1, cores=2, load=1.2) == 1  # a busy machine
    assert runtime.default_threads(1, cores=16, load=40.0) == 1
    monkeypatch.setenv("ZOO_NUM_THREADS", "3")
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("ZOO_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="ZOO_NUM_THREADS"):
        runtime.configure_threads()


def test_library_notes_nobody_can_act_on_are_dropped_and_other_records_kept():
    """torchao's Enum registrations (torch's _pytree logger) and bitsandbytes' optional CPU kernel (logged when peft
    imports it, on CPUs with AVX512-BF16): the messages as those libraries log them."""
    runtime.quiet()
    notes = {"torch.utils._pytree": ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.",
                                     ("<enum 'KernelPreference'>",)),
             "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", ("No module named 'kernels'",))}
    for name, (message, args) in notes.items():
        logger, seen = logging.getLogger(name), []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: seen.append(record.getMessage())  # (torch's loggers do not propagate to pytest's)
        logger.addHandler(handler)
        try:
            logger.warning(message, *args)
            logger.warning("something else from %s", name)
        finally:
            logger.removeHandler(handler)
        assert seen == [f"something else from {name}"], name


def test_a_clean_first_run_prints_no_noise_and_failed_runs_leave_no_folder(tmp_path):
    conf = write(tmp_path / "c.yaml", {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1}, "model": MODEL, "data": DATA})
    proc = zoo(["fit", "--config", conf, *QUIET], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("LeafSpec", "litlogger", "litmodels", "Total FLOPs", "module(s) in eval mode", "transfer_batch_to_device"):
        assert noise not in text, noise
    assert "| Params" in text and "trainable" in text  # the model summary is still there
    assert sorted(p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()) == ["version_0"]
    # A run that fails in setup (no data) leaves no version_1 behind.
    proc = zoo(["fit", "--config", conf, *QUIET, "--data=datamodules.MNIST", f"--data.data_dir={tmp_path}/none", "--data.download=false",
                '--model.init_args.model_kwargs={"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}'], tmp_path)
    assert proc.returncode == 2 and "MNIST not found" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()) == ["version_0"]


@pytest.mark.parametrize("args, message", [
    (["--model.model=timm/vit_tiny_patch16_22"], "Unknown model 'timm/vit_tiny_patch16_22'. Closest valid names: timm/vit_tiny_patch16_224"),
    (["--data.batch_size=0"], "batch_size=0: expected a positive integer"),
    (["--ckpt_path=empty.ckpt"], "is empty (0 bytes)"),
])
def test_bad_inputs_print_the_zoo_message_alone(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    (tmp_path / "empty.ckpt").touch()
    argv = ["fit", "--model=zoo.Classifier", "--model.model=zoo/mlp", '--model.model_kwargs={"in_chans": 1, "img_size": 8}',
            "--data=datamodules.Digits", "--trainer.max_steps=1", "--trainer.logger=false", *QUIET, *args]
    with pytest.raises(SystemExit) as exit_:
        cli.console(argv)  # what the `zoo` command runs
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert "Traceback" not in err and "Namespace(" not in err and "Union subtypes" not in err
    assert len(err.strip().splitlines()) <= 3
    monkeypatch.setenv("ZOO_TRACEBACK", "1")  # the full traceback on request
    with pytest.raises(Exception, match=r"Unknown model|batch_size=0|is empty"):
        cli.console(argv)


def test_last_checkpoint_folder_is_replaced_atomically(tmp_path):
    """A sharded run's last.ckpt is a distributed-checkpoint folder: the next save replaces it (os.replace alone cannot)."""
    from callbacks.checkpoint import replace

    last, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    for step in (1, 2):
        tmp.mkdir()
        (tmp / "meta.pt").write_text(str(step))
        replace(str(tmp), str(last))
        assert (last / "meta.pt").read_text() == str(step) and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    f = tmp_path / "x.tmp"
    f.write_text("file")
    replace(str(f), str(tmp_path / "x.ckpt"))
    assert (tmp_path / "x.ckpt").read_text() == "file"


def test_checkpoint_state_key_is_model_checkpoints_and_follows_its_monitor():
    """Checkpoint builds its state key once per monitor/mode (Lightning reads it at every hook): the same key."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = Checkpoint(monitor="val/loss", every_n_train_steps=5)
    assert ckpt.state_key == ModelCheckpoint.state_key.fget(ckpt)
    ckpt.monitor, ckpt.mode = "val/acc", "max"
    assert ckpt.state_key == ModelCheckpoint.state_key.fget(ckpt) and "val/acc" in ckpt.state_key
