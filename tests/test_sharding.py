"""Every technique under 2-process sharding (FSDP2 via Lightning's ``ModelParallelStrategy``, gloo on CPU).

One pair of processes (``OMP_NUM_THREADS=1``, started the way ``torchrun`` starts them) runs every case in turn, so
the imports are paid once. Each case fits a tiny config for 3 steps with a checkpoint at step 2 (the reference),
then resumes from that checkpoint to step 3. Half the cases save Lightning's distributed-checkpoint folder (the
default), half a consolidated single file (``save_distributed_checkpoint: false``). Each rank saves what it ended
with (whole tensors gathered with ``full_tensor``, and the size of its own shards) at teardown; the tests then check
in this process that the ranks agree, that the parameters really were sharded and trained, that the resumed run
ends with the reference's weights, and that ``zoo.load_zoo_module`` loads the sharded checkpoints on one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.helpers import ROOT, TINY_VIT_KWARGS, launch_pair, pair_logs, run_plan, wait_pair
from tests.standin import point_data_dirs, standin_args

STEPS, EVERY = 3, 2
SHARDED = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_nodes=1",
           "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
           "--trainer.strategy.init_args.data_parallel_size=2", "--trainer.strategy.init_args.tensor_parallel_size=1",
           "--trainer.strategy.init_args.timeout=0:01:00", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]
SHORT = [f"--trainer.max_steps={STEPS}", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
CONTINUAL = ["--data.init_args.data.init_args.batch_size=4", "--data.init_args.epochs_per_task=1"]

# case -> (config, extra CLI arguments, consolidated single-file checkpoint instead of the folder). The continual
# configs train with SGD without momentum, which has no optimizer state: torch 2.14's set_optimizer_state_dict cannot
# load a consolidated file into such an optimizer ("Expected device to be set"), so they resume from the folder.
CASES = {
    "classifier": ("quickstart.yaml", ["--data.init_args.batch_size=8"], False),
    "pruning": ("pruning/vit_fmnist_gradual.yaml", ["--data.init_args.batch_size=8", "--callbacks.pruning.init_args.schedule.init_args.start=0",
                                                    "--callbacks.pruning.init_args.schedule.init_args.end=2",
                                                    "--callbacks.pruning.init_args.schedule.init_args.frequency=1"], True),
    "distillation": ("distill/vit_to_small_vit.yaml", ["--data.init_args.batch_size=8"], True),
    "emoe": ("emoe/vit_fmnist.yaml", ["--data.init_args.batch_size=8"], True),
    "snnet": ("snnet/stitch.yaml", ["--data.init_args.batch_size=8", "--callbacks.sweep.init_args.latency_repeats=1", "--model.init_args.sample_per_rank=false"], False),
    "subtuning": ("subtuning/lite0_fmnist.yaml", ["--data.init_args.batch_size=8"], True),
    "er": ("continual/er_split_fmnist.yaml", CONTINUAL, False),
    "der": ("continual/der_seq_mnist.yaml", CONTINUAL, False),
    "derpp": ("continual/derpp_split_fmnist.yaml", CONTINUAL, False),
    "kfpf": ("continual/kfpf_split_fmnist.yaml", [*CONTINUAL, "--model.init_args.fpf_every=1", "--model.init_args.fpf_steps=2"], False),
    "lora": ("adapters/lora_vit.yaml", ["--data.init_args.batch_size=8"], True),
    "keys_values": ("adapters/keys_values.yaml", [], True),  # MiniLM: only the FFN keys and the head train
    # QAT's fake quantizers inside the sharded blocks (whole weights there), its observer freeze gathering whole rows; the
    # int8 conversion needs whole weights and is refused under sharding (tests/callbacks/test_quantize.py)
    "qat": ("quantize/qat_vit.yaml", ["--data.init_args.batch_size=8", "--callbacks.quantize.init_args.start_step=1",
                                      "--callbacks.quantize.init_args.freeze_step=2", "--callbacks.quantize.init_args.convert=false"], True),
}

# cases also run under DDP: the sharded run must train the same weights (FSDP's reduced gradient on each shard, the
# pruning masks on shards, SubTuning's prefix stopped inside the sharded backbone, BatchNorm statistics broadcast,
# k-FPF's FPF steps on the shards' reduced .grad against DDP's manual all-reduce)
DDP_REFERENCE = ("pruning", "subtuning", "kfpf")
# buffers each rank updates from its own batch after rank 0's were broadcast (as DDP's broadcast_buffers): they differ
# between ranks after the last step, under DDP too; the checkpoint holds rank 0's
PER_RANK_BUFFERS = ("running_mean", "running_var")


class RankState(Callback):
    """Saves to ``{out}{rank}.pt`` at teardown, and to ``{out}_step{EVERY}_{rank}.pt`` when the step-``EVERY`` checkpoint
    is saved (the state it holds): the whole state dict (DTensors gathered), the local shard sizes, the step."""

    def __init__(self, out: str):
        self.out = out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # every rank saves the checkpoint together
        if trainer.global_step == EVERY and not Path(f"{self.out}_step{EVERY}_{trainer.global_rank}.pt").exists():
            self.save(trainer, pl_module, f"{self.out}_step{EVERY}_")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.save(trainer, pl_module, self.out)

    def save(self, trainer, pl_module, prefix: str) -> None:
        from torch.distributed.tensor import DTensor

        from zoo.distillation.teachers import pool_of

        whole, local = {}, {}
        for k, v in pl_module.state_dict().items():  # the same order on every rank: full_tensor is a collective
            if isinstance(v, DTensor):
                local[k] = v.to_local().numel()
                v = v.full_tensor()
            whole[k] = v.detach().cpu().clone()
        trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        teachers = {f"{key}.{n}": (p.detach().clone(), p.requires_grad, isinstance(p, DTensor))
                    for key, t in pool_of(pl_module).teachers.items() for n, p in t.model.named_parameters()}
        in_optimizer = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        teachers_in_optimizer = any(id(p) in in_optimizer for t in pool_of(pl_module).teachers.values() for p in t.model.parameters())
        torch.save({"state_dict": whole, "local_numel": local, "global_step": trainer.global_step, "trainable": trainable,
                    "teachers": teachers, "teachers_in_optimizer": teachers_in_optimizer}, f"{prefix}{trainer.global_rank}.pt")


def plan_case(case: str, standin: Path, root: Path) -> dict:
    """The reference fit (step checkpoints in ``ckpt/``) and the fit resumed from step ``EVERY`` of one case."""
    config, extra, single_file = CASES[case]
    text = (ROOT / "configs" / config).read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(standin))
    run = root / case
    run.mkdir(parents=True)
    (run / "input.yaml").write_text(yaml.safe_dump(conf))  # not config.yaml: the CLI saves each run's config there
    args = ["fit", "--config", str(run / "input.yaml"), *standin_args(text), *extra, *SHARDED, *SHORT,
            f"--trainer.strategy.init_args.save_distributed_checkpoint={str(not single_file).lower()}",
            f"--checkpoint.dirpath={run / 'ckpt'}", "--checkpoint.filename={step}", f"--checkpoint.every_n_train_steps={EVERY}",
            "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null", "--checkpoint.every_n_epochs=null", "--trainer.callbacks+=tests.test_sharding.RankState"]
    runs = [[*args, f"--trainer.callbacks.out={run / 'reference'}"],
            [*args, f"--trainer.callbacks.out={run / 'resumed'}", f"--ckpt_path={run / 'ckpt' / f'step={EVERY}.ckpt'}"]]
    if case in DDP_REFERENCE:  # the same run under DDP (whole parameters, all-reduced gradients)
        ddp = [a for a in args if not a.startswith(("--trainer.strategy", "--checkpoint."))]
        runs.append([*ddp, "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy", "--trainer.strategy.init_args.timeout=0:01:00",
                     "--trainer.enable_checkpointing=false", f"--trainer.callbacks.out={run / 'ddp'}"])
    return {"case": case, "cwd": str(run), "runs": runs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every case in one pair of processes; each case's folder, and the pair's exit codes and logs."""
    from tests.standin import write_all

    root = tmp_path_factory.mktemp("sharded")
    standin = write_all(root / "standin")
    plan = [plan_case(case, standin, root) for case in CASES]
    codes = wait_pair(launch_pair("tests.test_sharding", plan, root), timeout=400)
    return {"root": root, "codes": codes, "logs": pair_logs(root)}


def _states(runs: dict, case: str, name: str) -> list[dict]:
    run = runs["root"] / case
    status = [(run / f"status{r}.txt").read_text() if (run / f"status{r}.txt").exists() else "not reached" for r in range(2)]
    if status != ["ok", "ok"]:
        pytest.fail(f"{case} sharded: rank 0: {status[0][-3000:]}\nrank 1: {status[1][-3000:]}\nexit codes {runs['codes']}\n{runs['logs']}")
    return [torch.load(run / f"{name}{r}.pt", weights_only=False) for r in range(2)]


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"


@pytest.mark.parametrize("case", list(CASES))
def test_trains_checkpoints_and_resumes_sharded(runs, case: str):
    from zoo.runtime import load_checkpoint

    reference = _states(runs, case, "reference")
    at_checkpoint = _states(runs, case, f"reference_step{EVERY}_")
    resumed = _states(runs, case, "resumed")
    for states, what in ((reference, "reference"), (resumed, "resumed")):
        assert [s["global_step"] for s in states] == [STEPS, STEPS]
        a, b = ({k: v for k, v in s["state_dict"].items() if not k.endswith(PER_RANK_BUFFERS)} for s in states)
        _assert_equal(a, b, f"{what}: the ranks' whole states")
        assert states[0]["trainable"] == states[1]["trainable"]
    # really sharded: a block's weight matrix is split over the ranks
    local, whole = at_checkpoint[0]["local_numel"], at_checkpoint[0]["state_dict"]
    assert any(n < whole[k].numel() for k, n in local.items()), "no parameter was sharded"
    assert {k.rsplit(".", 1)[0] for k in local} >= {k.rsplit(".", 1)[0] for k in reference[0]["trainable"]}
    # trained: every trainable tensor moved between the checkpoint (step 2) and the end (step 3), frozen ones did not
    final, before = reference[0]["state_dict"], at_checkpoint[0]["state_dict"]
    trainable = set(reference[0]["trainable"])
    moved = {k for k in trainable if k in final and not torch.equal(final[k], before[k])}
    assert moved, f"{case}: no trainable tensor changed in the last step"
    frozen = [k for k in final if k in local and k not in trainable and not torch.equal(final[k], before[k])]
    assert not frozen, f"{case}: frozen parameters changed: {frozen[:5]}"
    # resumed from the step-2 checkpoint (folder or single file): exactly the uninterrupted run
    _assert_equal(reference[0]["state_dict"], resumed[0]["state_dict"], f"{case}: resumed vs uninterrupted")
    # last.ckpt (rewritten at steps 2 and 3 of the reference, then by the resumed run) read on this process: the final state
    last = load_checkpoint(runs["root"] / case / "ckpt" / "last.ckpt")
    assert last["global_step"] == STEPS
    _assert_equal(last["state_dict"], {k: resumed[0]["state_dict"][k] for k in last["state_dict"]}, f"{case}: last.ckpt")


@pytest.mark.parametrize("case", DDP_REFERENCE)
def test_sharded_training_equals_ddp(runs, case: str):
    sharded = _states(runs, case, "reference")[0]["state_dict"]
    ddp = _states(runs, case, "ddp")[0]["state_dict"]
    assert sharded.keys() == ddp.keys()
    for k in sharded:  # the same sums, reduced in another order
        torch.testing.assert_close(sharded[k], ddp[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case}: {k}: {m}")


@pytest.mark.parametrize("case", ["classifier", "snnet", "emoe", "distillation", "pruning"])
def test_load_zoo_module_reads_a_sharded_checkpoint_on_one_process(runs, case: str):
    """``zoo.load_zoo_module`` of the step-2 checkpoint (a distributed-checkpoint folder, or a consolidated file),
    without a process group: the weights are the run's whole weights at that step, and the module runs."""
    from zoo import load_zoo_module
    from zoo.backbones import build_backbone

    at_checkpoint = _states(runs, case, f"reference_step{EVERY}_")[0]["state_dict"]
    path = runs["root"] / case / "ckpt" / f"step={EVERY}.ckpt"
    assert path.is_dir() != CASES[case][2], "the case saves the other checkpoint format"
    module = load_zoo_module(path)
    _assert_equal(at_checkpoint, {k: v for k, v in module.state_dict().items() if k in at_checkpoint}, f"{case}: loaded vs the run's")
    backbone = build_backbone(str(path))  # `model: <sharded run>.ckpt` for a teacher or a backbone
    _assert_equal({k: v for k, v in module.backbone.state_dict().items()}, backbone.state_dict(), "backbone from the path")


def test_distillation_teacher_is_a_whole_frozen_copy_outside_the_optimizer(runs):
    for state in _states(runs, "distillation", "reference"):
        assert state["teachers"] and not state["teachers_in_optimizer"]
        assert not any(k.startswith("teachers.") for k in state["state_dict"])
        assert all(not grad and not sharded for _, grad, sharded in state["teachers"].values())
    a, b = (_states(runs, "distillation", "reference")[r]["teachers"] for r in range(2))
    _assert_equal({k: v[0] for k, v in a.items()}, {k: v[0] for k, v in b.items()}, "the ranks' teachers")


def test_pruning_masks_hold_on_the_whole_tensors(runs):
    """Per-layer magnitude pruning to 0.8 at step 2: every pruned tensor has round(0.8 * numel) zeros over the whole
    tensor (shards pruned alone would round per shard), and the zeros stay through step 3 and a resume."""
    final = _states(runs, "pruning", "reference")[0]["state_dict"]
    weights = {k: v for k, v in final.items() if k.startswith("backbone.blocks.") and v.ndim >= 2}
    assert weights
    for k, w in weights.items():
        assert int((w == 0).sum()) == round(0.8 * w.numel()), k


def test_a_part_that_needs_whole_parameters_is_refused_before_training():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from callbacks.pruning import StructuredPruning
    from callbacks.pruning_schedules import OneShot
    from zoo import Classifier
    from zoo.sharding import check_strategy
    from zoo.snnet.module import check_sharded_sampling

    module = Classifier(model="timm/vit_tiny_patch16_224", num_classes=3, model_kwargs=dict(TINY_VIT_KWARGS))
    pruning = StructuredPruning(OneShot(final_sparsity=0.5))
    check_strategy(module, DDPStrategy(), [pruning])  # whole parameters: fine
    with pytest.raises(ValueError, match=r"Classifier: StructuredPruning cannot train under ModelParallelStrategy \(Torch-Pruning .*Strategies that work: single device, DDP"):
        check_strategy(module, ModelParallelStrategy(), [pruning])
    check_sharded_sampling(True, DDPStrategy(), 2)
    check_sharded_sampling(False, ModelParallelStrategy(), 2)
    with pytest.raises(ValueError, match="sample_per_rank=true cannot train under ModelParallelStrategy.*sample_per_rank: false"):
        check_sharded_sampling(True, ModelParallelStrategy(), 2)
    # adapter parts that need whole parameters (E3VA's highway hooks, RankSchedule's pruning of adapter matrices):
    # Classifier.setup refuses them, before configure_model shards anything
    from callbacks.rank_schedule import RankSchedule
    from zoo.adapters.e3va import E3VA

    for part in (E3VA(), RankSchedule()):
        check_strategy(module, DDPStrategy(), [part])
        with pytest.raises(ValueError, match=rf"Classifier: {type(part).__name__} cannot train under ModelParallelStrategy \(.*DTensor.*Strategies that work: single device, DDP"):
            check_strategy(module, ModelParallelStrategy(), [part])


def test_lora_adapters_train_shard_and_load_on_one_process(runs):
    """LoRA (peft layers inside the sharded blocks): only the adapters and the head train, the adapters are sharded
    too; sharded, the checkpoint holds the whole state (zoo.adapters.checkpoint), and ``zoo.load_zoo_module`` rebuilds
    the run's weights at that step on one process, base and adapters."""
    from zoo import load_zoo_module
    from zoo.adapters.lora import lora_layers

    at_checkpoint = _states(runs, "lora", f"reference_step{EVERY}_")[0]
    whole, local = at_checkpoint["state_dict"], at_checkpoint["local_numel"]
    trainable = _states(runs, "lora", "reference")[0]["trainable"]
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable), trainable
    assert any(".lora_A." in k and n < whole[k].numel() for k, n in local.items()), "adapters not sharded"
    module = load_zoo_module(runs["root"] / "lora" / "ckpt" / f"step={EVERY}.ckpt")
    assert lora_layers(module.backbone)
    loaded = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    _assert_equal(whole, {k: loaded[k].detach() for k in whole}, "lora: loaded vs the run's")


if __name__ == "__main__":
    run_plan(sys.argv[1], keep_going=True)  # a failed case is recorded and the next one tried


def test_a_sharded_folder_converts_to_a_plain_file_and_back(runs, tmp_path):
    """``zoo.reshard`` on the classifier case's step-2 folder (written by ModelParallelStrategy): the plain file holds
    the folder's weights and its optimizer states by position, which the module's own optimizer loads; converted back,
    the optimizer states are the folder's, name for name (tests/zoo/test_reshard.py checks the other direction against
    torch's full optimizer state dict)."""
    from tests.zoo.test_reshard import same
    from zoo import load_zoo_module, reshard
    from zoo.runtime import load_checkpoint

    assert runs["codes"] == [0, 0], runs["logs"]
    folder = runs["root"] / "classifier" / "ckpt" / f"step={EVERY}.ckpt"
    saved = load_checkpoint(folder, optimizers=True)
    assert folder.is_dir() and reshard.optimizer_layout(saved) == "sharded" and saved["optimizer_states"][0]["state"]
    reshard.convert(folder, tmp_path / "plain.ckpt", "plain")
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    assert reshard.optimizer_layout(plain) == "plain" and same(plain["state_dict"], saved["state_dict"])
    module = load_zoo_module(tmp_path / "plain.ckpt")
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer.load_state_dict(plain["optimizer_states"][0])
    params = dict(module.named_parameters())
    for name, state in saved["optimizer_states"][0]["state"].items():
        assert all(torch.equal(optimizer.state[params[name]][k], v) for k, v in state.items() if k != "step"), name
    reshard.convert(tmp_path / "plain.ckpt", tmp_path / "sharded.ckpt", "sharded")
    assert same(torch.load(tmp_path / "sharded.ckpt", weights_only=False)["optimizer_states"], saved["optimizer_states"])
