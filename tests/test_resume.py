"""Exact mid-epoch resume: for every technique's main config, a run killed (SIGKILL) mid-epoch and resumed from
its latest step checkpoint ends with exactly the weights of a run that was never interrupted, and logs the same epoch
values (the resumed epoch's ``train/*`` means and accuracy over the whole epoch).

Configs run on tiny stand-in data (tests/standin.py, ``# standin:`` lines as in tests/test_configs.py), shrunk
to 3 batches an epoch and 5 steps, with a step checkpoint every 2 steps. The killed run (a forked child of this
process, which SIGKILLs itself) dies at step 3, so it resumes from step 2 (epoch 0, one batch left), crosses an
epoch end and a validation, and stops at step 5. Uninterrupted and resumed runs run in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.helpers import ROOT
from tests.standin import standin_args

STEPS, EVERY, KILL, BATCHES = 5, 2, 3, 3

# technique -> (config, {class_path: init_args to change wherever the config uses that class})
CASES = {
    "quickstart": ("quickstart.yaml", {}),
    "pruning": ("pruning/vit_fmnist_gradual.yaml", {"callbacks.pruning_schedules.Cubic": {"start": 0, "end": 5, "frequency": 1, "final_sparsity": 0.9}}),
    "continual_er": ("continual/er_split_fmnist.yaml", {}),
    "continual_derpp": ("continual/derpp_split_fmnist.yaml", {}),
    # an FPF before and after the kill, task-end FPFs at steps 2 and 4, a final one at step 5
    "continual_kfpf": ("continual/kfpf_split_fmnist.yaml", {"zoo.continual.KFPF": {"fpf_every": 2, "fpf_steps": 2}}),
    "distill": ("distill/vit_to_small_vit.yaml", {}),
    "emoe": ("emoe/vit_fmnist.yaml", {}),
    "snnet": ("snnet/stitch.yaml", {}),
    "subtuning": ("subtuning/lite0_fmnist.yaml", {}),
    "compose_subtuning_er": ("compose/subtuning_er.yaml", {}),
    "adapters_lora": ("adapters/lora_vit.yaml", {}),
    "adapters_e3va": ("adapters/e3va_vit.yaml", {}),
    # components pruned at steps 1..4 (the schedule's state and the importance averages cross the kill)
    "adapters_dynamic_rank": ("adapters/dynamic_dora.yaml", {"callbacks.rank_schedule.RankSchedule": {"interval": 1, "start_ratio": 0.2, "end_ratio": 0.2}}),
    # fake quantisation from step 1, weight scales frozen at step 2 (before the kill at 3)
    "quantize_qat": ("quantize/qat_vit.yaml", {"callbacks.quantize.QuantizationAwareTraining": {"start_step": 1, "freeze_step": 2, "convert": False}}),
}


class KillAt(Callback):
    """SIGKILLs this process at the end of training step ``step`` (after the checkpoints of earlier steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _patched(node, data_dir: str, init_args: dict[str, dict]):
    """``node`` with every ``data_dir`` pointed at ``data_dir`` and the ``init_args`` of the given classes updated."""
    if isinstance(node, list):
        return [_patched(v, data_dir, init_args) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: (data_dir if k == "data_dir" else _patched(v, data_dir, init_args)) for k, v in node.items()}
    if node.get("class_path") in init_args:
        node["init_args"] = {**(node.get("init_args") or {}), **init_args[node["class_path"]]}
    return node


def shrunk_args(config: str, data_dir: Path, out: Path, init_args: dict[str, dict], extra: tuple[str, ...] = ()) -> list[str]:
    """``fit`` arguments running ``config`` (read now: configs change) on stand-in data, shrunk, with step checkpoints in ``out``."""
    text = (ROOT / "configs" / config).read_text()
    conf = yaml.safe_load(text)
    conf = {k: (_patched(v, str(data_dir), init_args) if k != "model" else v) for k, v in conf.items()}
    model = conf["model"]
    if model.get("class_path") in init_args:  # a technique's model arguments too (e.g. k-FPF's fpf_every)
        model["init_args"] = {**(model.get("init_args") or {}), **init_args[model["class_path"]]}
    patched = out / Path(config).name
    out.mkdir(parents=True, exist_ok=True)
    patched.write_text(yaml.safe_dump(conf))
    standin = standin_args(text)
    nested = "data" in (conf["data"].get("init_args") or {})  # continual: the stream wraps a datamodule
    batch = "--data.init_args.data.init_args.batch_size=8" if nested else "--data.init_args.batch_size=8"
    return ["fit", "--config", str(patched), *standin, batch, *extra,
            f"--trainer.max_steps={STEPS}", f"--trainer.limit_train_batches={BATCHES}", "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=1", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={out / 'ckpt'}",
            f"--trainer.callbacks.every_n_train_steps={EVERY}", "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1"]


def fit(args: list[str], cwd: Path, monkeypatch):
    """Run ``zoo`` in this process; the CLI object."""
    import cli

    monkeypatch.chdir(cwd)
    run = cli.main(args)
    assert run.trainer.global_step == STEPS
    return run


def weights(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


class Recorder(Callback):
    """The logged values of each training epoch (``train/*`` but the step loss) that ended in this process, read at
    the next epoch's start and at the end (a callback's epoch-end hook runs before the module logs)."""

    def __init__(self):
        self.epochs: dict[int, dict[str, float]] = {}
        self.ends: list[int] = []  # global step at each epoch end
        self._ended: int | None = None

    def _record(self, trainer) -> None:
        if self._ended is not None:
            self.epochs[self._ended] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and k != "train/loss_step"}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._ended = trainer.current_epoch
        self.ends.append(trainer.global_step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._record(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer)


def recorder(run) -> Recorder:
    return next(c for c in run.trainer.callbacks if isinstance(c, Recorder))


def _killed_child(args: list[str], cwd: Path) -> None:
    os.environ["ZOO_NUM_THREADS"] = "1"  # a forked child must not start an OpenMP pool
    torch.set_num_threads(1)
    os.chdir(cwd)
    import cli

    cli.main([*args, f"--trainer.callbacks+={__name__}.KillAt", f"--trainer.callbacks.step={KILL}"])
    os._exit(0)


def fit_killed(args: list[str], cwd: Path) -> None:
    """Run ``zoo`` in a child process that SIGKILLs itself at the end of step ``KILL``."""
    child = multiprocessing.get_context("fork").Process(target=_killed_child, args=(args, cwd))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, f"expected the child to die of SIGKILL, got exit code {child.exitcode}"


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory) -> Path:
    from tests.standin import write_all

    return write_all(tmp_path_factory.mktemp("standin"))


def _same_optimization(reference, resumed) -> None:
    """The resumed run uses the run's optimizer and LR scheduler (LightningCLI alone would drop them)."""
    ref = [type(o).__name__ for o in reference.trainer.optimizers], len(reference.trainer.lr_scheduler_configs)
    res = [type(o).__name__ for o in resumed.trainer.optimizers], len(resumed.trainer.lr_scheduler_configs)
    assert ref == res, f"--ckpt_path replaced the run's optimizer/LR scheduler {ref} by {res}"


@pytest.mark.parametrize("case", list(CASES))
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(case: str, standin_dir: Path, tmp_path: Path, monkeypatch):
    config, init_args = CASES[case]
    record = (f"--trainer.callbacks+={__name__}.Recorder",)
    reference = fit(shrunk_args(config, standin_dir, tmp_path / "reference", init_args) + list(record), tmp_path, monkeypatch)
    killed = tmp_path / "killed"
    args = shrunk_args(config, standin_dir, killed, init_args)
    fit_killed(args, tmp_path)
    last = killed / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == EVERY
    loader = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [(s["epoch"], s["batches"]) for s in loader] == [(0, EVERY)]  # mid-epoch: one batch of epoch 0 left
    resumed = fit([*args, *record, f"--ckpt_path={last}"], tmp_path, monkeypatch)
    _same_optimization(reference, resumed)
    assert_same_weights(weights(reference), weights(resumed))
    # every epoch that ended after the resume logs what the uninterrupted run logged, the resumed epoch its means over
    # the whole epoch (zoo.epoch_state); a checkpoint at an epoch's last batch resumes at the next epoch
    ref, res = recorder(reference), recorder(resumed)
    assert min(res.epochs) == (1 if EVERY in ref.ends else 0) and "train/loss_epoch" in ref.epochs[0]
    assert {e: ref.epochs[e] for e in res.epochs} == res.epochs


def test_augmented_dropout_run_needs_the_loader_state_and_the_rng_states(standin_dir: Path, tmp_path: Path, monkeypatch):
    """Random augmentation and dropout: exact with the checkpoint's loader state, not without it or without its RNG states."""
    conf = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    kwargs = {**conf["model"]["init_args"]["model_kwargs"], "drop_rate": 0.2, "proj_drop_rate": 0.2}
    extra = ("--data.init_args.augment=true", f"--model.init_args.model_kwargs={kwargs}")
    reference_run = fit(shrunk_args("quickstart.yaml", standin_dir, tmp_path / "reference", {}, extra), tmp_path, monkeypatch)
    reference = weights(reference_run)
    killed = tmp_path / "killed"
    args = shrunk_args("quickstart.yaml", standin_dir, killed, {}, extra)
    fit_killed(args, tmp_path)
    last = killed / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    variants = {"as saved": state}
    for name, change in (("no loader state", lambda s: s.clear()), ("no RNG states", lambda s: s[0].update(rng=None))):
        variant = torch.load(last, weights_only=False)
        change(variant["loops"]["fit_loop"]["state_dict"]["combined_loader"])
        variants[name] = variant
    results = {}
    for name, variant in variants.items():
        path = tmp_path / f"{name.replace(' ', '_')}.ckpt"
        torch.save(variant, path)
        run = fit([*args, f"--ckpt_path={path}"], tmp_path, monkeypatch)
        _same_optimization(reference_run, run)
        results[name] = weights(run)
    assert_same_weights(reference, results["as saved"])
    for name in ("no loader state", "no RNG states"):
        assert any(not torch.equal(reference[k], results[name][k]) for k in reference), f"resuming with {name} is exact too: the test proves nothing"
