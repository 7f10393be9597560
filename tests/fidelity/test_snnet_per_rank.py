"""Issue 16 item 2: under DDP each rank trains its own stitch each step, as the official SN-Net / SN-Netv2 code.

Official (ziplab/SN-Net ``stitching_deit/main.py``, SN-Netv2 ``classification/main.py``): ``np.random.seed(seed + rank)``
and ``forward`` draws the stitch with ``np.random``, so N processes train N stitches per step (DDP with
``find_unused_parameters=True``). Here rank ``r`` draws from ``StitchSampler.sample(rank=r)`` (stream ``sample_seed + r``).
The checkpoint holds the base seed and the draw count (the same on every rank); each rank's stream after a resume is
derived from (seed, rank, draw count).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback

import cli
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS, run_cli
from zoo.snnet import SNNetModule, StitchSampler

ANCHORS = [{"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": w}} for w in (32, 16)]
SEED = 3


class RecordRankStitches(Callback):
    """Saves the stitch of every training step of this rank to ``out_dir/stitches{rank}.pt``, and a checkpoint at the end."""

    def __init__(self, out_dir: str):
        self.out_dir, self.stitches = out_dir, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stitches.append(pl_module.last_stitch)

    def on_train_end(self, trainer, pl_module):
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.stitches, Path(self.out_dir) / f"stitches{trainer.global_rank}.pt")
        trainer.save_checkpoint(Path(self.out_dir) / "last.ckpt")  # every rank calls it, rank 0 writes


def fit_args(tmp_path: Path, out: str, steps: int, devices: int) -> list[str]:
    return ["fit", "--model=zoo.snnet.SNNetModule", f"--model.anchors={json.dumps(ANCHORS)}", f"--model.sample_seed={SEED}",
            "--model.init_batch_size=16", "--data=datamodules.Digits", "--data.batch_size=8", f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.strategy={'ddp_find_unused_parameters_true' if devices > 1 else 'auto'}", f"--trainer.devices={devices}",
            "--trainer.accelerator=cpu", "--trainer.callbacks+=tests.fidelity.test_snnet_per_rank.RecordRankStitches",
            f"--trainer.callbacks.out_dir={tmp_path / out}", "--trainer.callbacks+=tests.helpers.SaveRankState", f"--trainer.callbacks.out_dir={tmp_path / out}"]


def test_each_rank_trains_its_seeded_stitch_and_resumes_its_stream(tmp_path, monkeypatch):
    n = len(SNNetModule(ANCHORS).net)
    expected = []
    for rank in range(2):  # the per-rank sampler by itself: stream seed + rank, draws 0..5
        sampler = StitchSampler([0] * n, seed=SEED)
        expected.append([sampler.sample(rank=rank) for _ in range(6)])
    assert expected[0][3:] != expected[1][3:]
    shifted = StitchSampler([0] * n, seed=SEED + 1)  # official seeding: rank r draws what seed + r draws on rank 0
    assert [shifted.sample() for _ in range(6)] == expected[1]

    # 3 steps in this process (rank 0's stream), then 3 more on 2 DDP processes resumed from its checkpoint
    monkeypatch.chdir(tmp_path)
    cli.main(fit_args(tmp_path, "first", 3, devices=1))
    assert torch.load(tmp_path / "first" / "stitches0.pt") == expected[0][:3]
    ckpt = torch.load(tmp_path / "first" / "last.ckpt", weights_only=False)
    assert ckpt["snnet"]["sampler"]["draws"] == 3 and ckpt["snnet"]["sampler"]["seed"] == SEED  # base seed: each rank adds its own

    run_cli([*fit_args(tmp_path, "second", 6, devices=2), f"--ckpt_path={tmp_path / 'first' / 'last.ckpt'}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    second = [torch.load(tmp_path / "second" / f"stitches{r}.pt") for r in range(2)]
    assert second == [expected[0][3:], expected[1][3:]]  # N processes train N (different) stitches per step, each its own stream
    states = [torch.load(tmp_path / "second" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert states[0]["global_step"] == states[1]["global_step"] == 6
    for k, v in states[0]["state_dict"].items():  # gradients of different stitches averaged: the replicas stay identical
        torch.testing.assert_close(v, states[1]["state_dict"][k], msg=k)
