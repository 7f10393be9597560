"""Each technique's main shipped config, with its own callbacks and a TensorBoard logger, under 2-process CPU DDP.

One pair of processes (gloo, ``OMP_NUM_THREADS=1``, started the way ``torchrun`` starts them) runs every config
in turn for a few steps on tiny stand-in data (see tests/test_configs.py), so the imports are paid once. Each
config's test then checks that both ranks ended with identical weights, that the logger wrote the callback's
figures and scalars, and that the callback's files exist. A collective reached by one rank only (the bug of
issue 14) hangs the pair: the process group's timeout (``DDPStrategy(timeout=...)``) turns it into an error,
and the subprocess timeout into a failure. ``test_one_rank_collective_ends_within_the_timeout`` checks that
bound on a real ``zoo fit`` run, stopped with SIGTERM as a scheduler stops a job.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.helpers import ROOT, kill, launch_pair, pair_logs, run_plan, wait_pair
from tests.standin import point_data_dirs, standin_args

CONFIGS = ROOT / "configs"
RUN = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_nodes=1", "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
       "--trainer.strategy.init_args.timeout=0:01:00", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
SMALL_BATCHES = ["--data.init_args.batch_size=8"]  # the stand-in Fashion-MNIST has 64 training images: 4 batches per rank

# config -> (init_args merged into its callbacks (by class name) in the test's copy, CLI arguments that shrink the run)
CASES = {
    "quickstart.yaml": ({}, SHORT),
    # two tasks of one epoch each: the first task end happens inside the run, the second at its end
    "continual/er_split_fmnist.yaml": ({}, ["--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                                            "--data.init_args.epochs_per_task=1", "--data.init_args.data.init_args.batch_size=4"]),
    # pruning steps at steps 0, 1 and 2 (sparsity 0, 0.7, 0.8)
    "pruning/vit_fmnist_gradual.yaml": ({"MagnitudePruning": {"schedule": {"init_args": {"start": 0, "end": 2, "frequency": 1}}}},
                                        ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", *SMALL_BATCHES]),
    "distill/vit_to_small_vit.yaml": ({}, [*SHORT, *SMALL_BATCHES]),
    "emoe/vit_fmnist.yaml": ({"ExpertLoad": {"log_every_n_steps": 1}}, [*SHORT, *SMALL_BATCHES]),
    "snnet/stitch.yaml": ({"StitchSweep": {"latency_repeats": 1}}, [*SHORT, *SMALL_BATCHES, "--trainer.strategy.init_args.find_unused_parameters=true"]),
    "subtuning/profile.yaml": ({"SubTuningProfile": {"steps": 1, "batch_size": 8, "k": 1, "max_val_samples": 8, "start": "best"}}, [*SHORT, *SMALL_BATCHES]),
    "adapters/lora_vit.yaml": ({}, [*SHORT, *SMALL_BATCHES]),
    "adapters/e3va_vit.yaml": ({}, [*SHORT, *SMALL_BATCHES]),
    # components pruned at both steps
    "adapters/dynamic_dora.yaml": ({"RankSchedule": {"interval": 1, "start_ratio": 0.0, "end_ratio": 0.0}}, [*SHORT, *SMALL_BATCHES]),
    # fake quantisation from step 0, int8 at the end
    "quantize/qat_vit.yaml": ({"QuantizationAwareTraining": {"start_step": 0, "freeze_step": 1}}, [*SHORT, *SMALL_BATCHES]),
    "quantize/ptq_vit.yaml": ({"PostTrainingQuantization": {"calibration_batches": 1}}, [*SHORT, *SMALL_BATCHES]),
    # the convnet QAT (int8_pt2e; on its stand-in model): the exported graph's quantizers from step 0, converted at the end
    "quantize/qat_lite0.yaml": ({"QuantizationAwareTraining": {"start_step": 0, "freeze_step": 1}}, [*SHORT, *SMALL_BATCHES]),
}


class RankState(Callback):
    """Saves what each rank ends with to ``rank{r}.pt`` at teardown (after every ``on_fit_end``, e.g. StitchSweep's)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.train_loss_sums = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # before the module's: its running sums of this rank
        total = getattr(pl_module, "epoch_sums", {}).get("train/loss")
        self.train_loss_sums = None if total is None else (float(total[0]), total[1])

    def teardown(self, trainer, pl_module, stage: str) -> None:
        net = getattr(pl_module, "net", None)
        logged = trainer.callback_metrics.get("train/loss_epoch")
        torch.save({
            "train_loss_sums": self.train_loss_sums,  # (sum of loss x batch size, samples) of the last epoch on this rank
            "train_loss_epoch": None if logged is None else float(logged),
            "state_dict": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            "global_step": trainer.global_step,
            "acc_matrix": getattr(pl_module, "acc_matrix", None),
            "active_stitch": getattr(net, "active", None),
            "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
        }, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class OneRankBarrier(Callback):
    """Rank 0 enters a barrier that rank 1 never reaches (rank 1 keeps busy): the shape of issue 14's hang."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            time.sleep(300)
            return
        Path(self.marker).write_text(str(time.time()))
        trainer.strategy.barrier("reached_by_rank_0_only")


def _merge(node: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(node.get(k), dict):
            _merge(node[k], v)
        else:
            node[k] = v


def _callback_specs(conf: dict) -> list[dict]:
    """The config's callbacks, in ``trainer.callbacks`` (a list) or the zoo's named ``callbacks`` (a dict)."""
    listed = (conf.get("trainer") or {}).get("callbacks") or []
    named = list((conf.get("callbacks") or {}).values()) if isinstance(conf.get("callbacks"), dict) else []
    return [c for c in [*listed, *named] if isinstance(c, dict)]


def prepare(config: str, run_dir: Path, standin: Path) -> list[str]:
    """The ``zoo fit`` arguments of one config in ``run_dir``: its copy on stand-in data, shrunk, plus RankState."""
    text = (CONFIGS / config).read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(standin))
    patches, shrink = CASES[config]
    specs = _callback_specs(conf)
    for name, update in patches.items():
        found = [c for c in specs if c.get("class_path", "").rsplit(".", 1)[-1] == name]
        assert found, f"{config} has no {name} callback"
        for spec in found:
            spec.setdefault("init_args", {})
            _merge(spec["init_args"], update)
    trainer = conf.setdefault("trainer", {})
    trainer["callbacks"] = [*(trainer.get("callbacks") or []), {"class_path": "tests.test_ddp_configs.RankState", "init_args": {"out_dir": str(run_dir)}}]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(conf))
    return ["fit", "--config", str(run_dir / "config.yaml"), *standin_args(text), *RUN, *shrink]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, Path]:
    """Runs every case in one pair of DDP processes; returns each config's run directory."""
    from tests.standin import write_all

    root = tmp_path_factory.mktemp("ddp")
    standin = write_all(root / "standin")
    runs = {config: root / config.replace("/", "_").removesuffix(".yaml") for config in CASES}
    plan = [{"config": c, "cwd": str(d), "runs": [prepare(c, d, standin)]} for c, d in runs.items()]
    codes = wait_pair(launch_pair("tests.test_ddp_configs", plan, root), timeout=240)
    logs = pair_logs(root, 5000)
    runs["_codes"] = codes
    runs["_logs"] = logs
    return runs


def _result(ddp_runs: dict, config: str) -> tuple[Path, list[dict]]:
    run_dir = ddp_runs[config]
    status = [(run_dir / f"status{r}.txt").read_text() if (run_dir / f"status{r}.txt").exists() else "not reached" for r in range(2)]
    if status != ["ok", "ok"]:
        pytest.fail(f"{config} under DDP: rank 0: {status[0][-3000:]}\nrank 1: {status[1][-3000:]}\nexit codes {ddp_runs['_codes']}\n{ddp_runs['_logs']}")
    states = [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return run_dir, states


def _assert_same_weights(states: list[dict]) -> None:
    a, b = (s["state_dict"] for s in states)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks differ in {k}"
    assert states[0]["global_step"] == states[1]["global_step"] > 0


def _tags(run_dir: Path) -> dict[str, set[str]]:
    """TensorBoard tags (scalars, images) in the event files under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {run_dir}"
    tags = {"scalars": set(), "images": set()}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 1, "scalars": 1})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags().get(kind, []))
    return tags


def _one(run_dir: Path, pattern: str) -> Path:
    found = sorted(run_dir.rglob(pattern))
    assert len(found) == 1, f"expected one {pattern} under {run_dir}, found {found}"
    return found[0]


def test_quickstart(ddp_runs):
    run_dir, states = _result(ddp_runs, "quickstart.yaml")
    _assert_same_weights(states)
    # the epoch's train/loss_epoch is the mean over both ranks' samples, the same on both (not rank 0's own mean)
    (t0, n0), (t1, n1) = (s["train_loss_sums"] for s in states)
    assert t0 / n0 != t1 / n1  # the ranks saw different samples
    assert states[0]["train_loss_epoch"] == states[1]["train_loss_epoch"] == pytest.approx((t0 + t1) / (n0 + n1), rel=1e-6)
    assert {"train/loss_step", "val/acc"} <= _tags(run_dir)["scalars"]
    assert list(run_dir.rglob("*.ckpt")), "the checkpoint callback wrote nothing"


def test_continual_crosses_a_task_end(ddp_runs):
    run_dir, states = _result(ddp_runs, "continual/er_split_fmnist.yaml")
    _assert_same_weights(states)
    torch.testing.assert_close(states[0]["acc_matrix"], states[1]["acc_matrix"], rtol=0, atol=0, equal_nan=True)
    rows = _one(run_dir, "acc_matrix.csv").read_text().splitlines()
    assert rows[0] == "after_task,task_0,task_1" and len(rows) == 3  # both task ends, each rank through on_task_end
    assert _one(run_dir, "continual_metrics.csv").read_text().count("\n") == 3
    tags = _tags(run_dir)
    assert "continual/avg_acc" in tags["scalars"] and "continual/acc_matrix" in tags["images"]


def test_pruning_step_under_ddp(ddp_runs):
    run_dir, states = _result(ddp_runs, "pruning/vit_fmnist_gradual.yaml")
    _assert_same_weights(states)
    weights = [v for k, v in states[0]["state_dict"].items() if k.startswith("backbone.blocks.") and v.ndim >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)  # the schedule's last step, masks baked in at the end
    tags = _tags(run_dir)
    assert "pruning/measured" in tags["scalars"] and "pruning/sparsity_schedule" in tags["images"]


def test_distillation(ddp_runs):
    run_dir, states = _result(ddp_runs, "distill/vit_to_small_vit.yaml")
    _assert_same_weights(states)
    assert not any(k.startswith("teachers.") for k in states[0]["state_dict"])
    assert {"train/soft_target_kl", "train/attention_distill", "val/acc"} <= _tags(run_dir)["scalars"]


def test_emoe_with_expert_load(ddp_runs):
    run_dir, states = _result(ddp_runs, "emoe/vit_fmnist.yaml")
    _assert_same_weights(states)
    tags = _tags(run_dir)
    assert any(t.startswith("expert_load/") and t.endswith("/max") for t in tags["scalars"]) and "expert_load/heatmap" in tags["images"]


def test_snnet_with_stitch_sweep(ddp_runs):
    run_dir, states = _result(ddp_runs, "snnet/stitch.yaml")
    _assert_same_weights(states)
    ids = [int(line.split(",")[0]) for line in _one(run_dir, "stitch_sweep.csv").read_text().splitlines()[1:]]
    assert ids == list(range(len(ids))) and len(ids) > 3
    assert states[0]["active_stitch"] == states[1]["active_stitch"]  # both ranks selected the sweep's best stitch
    assert "snnet/acc_vs_flops" in _tags(run_dir)["images"]


def test_subtuning_profile(ddp_runs):
    run_dir, states = _result(ddp_runs, "subtuning/profile.yaml")
    _assert_same_weights(states)
    assert states[0]["trainable"] == states[1]["trainable"]
    chosen = yaml.safe_load(_one(run_dir, "trainable_layers.yaml").read_text())["model"]["init_args"]["trainable_layers"]
    assert len(chosen) == 1  # start: best, k: 1; both ranks train exactly rank 0's choice
    assert {n.split(".")[0] for n in states[0]["trainable"]} == {"head", "backbone"}
    assert all(n.startswith(("head.", f"backbone.{chosen[0]}.")) for n in states[0]["trainable"])
    assert _one(run_dir, "profile.csv").exists() and "subtuning/profile" in _tags(run_dir)["images"]


def test_lora(ddp_runs):
    run_dir, states = _result(ddp_runs, "adapters/lora_vit.yaml")
    assert {"lora_A", "lora_B"} <= {part for k in states[0]["trainable"] for part in k.split(".")}
    _assert_same_weights(states)
    assert "val/acc" in _tags(run_dir)["scalars"]


def test_e3va(ddp_runs):
    run_dir, states = _result(ddp_runs, "adapters/e3va_vit.yaml")
    _assert_same_weights(states)
    assert all(n.startswith(("head.", "backbone.e3va.")) for n in states[0]["trainable"])


def test_dynamic_rank_prunes_the_same_components_on_both_ranks(ddp_runs):
    run_dir, states = _result(ddp_runs, "adapters/dynamic_dora.yaml")
    _assert_same_weights(states)  # the masks (buffers) too
    scalers = [v for k, v in states[0]["state_dict"].items() if k.endswith("lora_scaler")]
    assert scalers and sum(int((s == 0).sum()) for s in scalers) > 0  # the schedule pruned components (their scalars are zero)


def test_qat_then_int8(ddp_runs):
    run_dir, states = _result(ddp_runs, "quantize/qat_vit.yaml")
    _assert_same_weights(states)
    assert "val/acc" in _tags(run_dir)["scalars"]


def test_pt2e_qat_keeps_the_ranks_quantizers_equal_and_saves_the_int8_model(ddp_runs):
    run_dir, states = _result(ddp_runs, "quantize/qat_lite0.yaml")
    _assert_same_weights(states)  # after conversion: the int8 graph's weights and the calibrated q/dq parameters
    assert _one(run_dir, "quantized.ckpt").stat().st_size > 0


def test_ptq_saves_the_int8_model(ddp_runs):
    run_dir, states = _result(ddp_runs, "quantize/ptq_vit.yaml")
    _assert_same_weights(states)
    assert _one(run_dir, "quantized.ckpt").stat().st_size > 0


def test_one_rank_collective_ends_within_the_timeout(tmp_path):
    """A rank waiting in a collective that the other never reaches stops with an error after
    ``DDPStrategy(timeout=...)``, also when a scheduler sends SIGTERM meanwhile (Lightning's handler cannot run then)."""
    marker, timeout = tmp_path / "waiting", 10  # the timeout also bounds the start-up rendezvous of the two processes
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *RUN[:4], f"--trainer.strategy.init_args.timeout=0:00:{timeout}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.callbacks+=tests.test_ddp_configs.OneRankBarrier", f"--trainer.callbacks.marker={marker}"]
    procs = launch_pair("tests.test_ddp_configs", [{"config": "quickstart.yaml", "cwd": str(tmp_path), "runs": [args]}], tmp_path)
    try:
        while not marker.exists() and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        assert marker.exists(), f"the run ended before rank 0 waited:\n{pair_logs(tmp_path, 5000)}"
        for p in procs:  # what `timeout` and schedulers send to a job's processes
            p.send_signal(signal.SIGTERM)
        sent = time.time()
        for p in procs:
            p.wait(timeout=3 * timeout + 30)
        took = time.time() - sent
    finally:
        kill(procs)
    assert procs[0].returncode != 0
    assert took < 3 * timeout + 10, f"took {took:.1f}s to stop after SIGTERM"
    status = (tmp_path / "status0.txt").read_text()
    assert "timed out" in status.lower() or "timeout" in status.lower(), status[-4000:]


if __name__ == "__main__":
    run_plan(sys.argv[1], keep_going=False)  # a failed DDP run may leave the process group unusable
