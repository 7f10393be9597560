"""Distillation cost and correctness, side by side in one run.

Times a training step (forward, backward, optimizer; the Lightning loop included) of the same small CNN student on
Fashion-MNIST-sized batches (1 x 32 x 32, batch 128):

* student alone (``zoo.Classifier``, cross-entropy),
* distilled from cached teacher outputs (``cache_teacher: true``: logits read from a memory-mapped file),
* distilled from the online teacher (EfficientNet-Lite0's forward pass in every step, for reference),

and checks the KD losses (SoftTargetKL, DecoupledKD, float32) against a float64 computation by hand.

    python benchmarks/distill.py [--steps 30] [--rounds 4] [--data-dir data] [--default-malloc]

Each timed run has a process of its own (the cache is filled once beforehand, in another process); the three
alternate over ``--rounds`` rounds and the fastest round of each counts. All processes run with the same fixed
glibc malloc thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``; skip with
``--default-malloc``). With glibc's default dynamic thresholds, which move with what a process allocated and freed
before (a distillation process loads the teacher and hashes its weights), the same student step was 15-20 % slower
in the distillation process than in the student-alone one, although the student's forward, backward and update are
the same code on the same batches; reading the cached logits costs ~0.2 ms a step and the two loss terms ~0.4 ms.
Fixed thresholds (or jemalloc/tcmalloc) are worth setting for training runs on CPU too.

Ends with one JSON line: cached_step_vs_student_alone, online_step_vs_student_alone, kd_loss_max_abs_err.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from datamodules import FashionMNIST  # noqa: E402
from timing import StepTimer  # noqa: E402
from zoo import Classifier  # noqa: E402
from zoo.distillation import DecoupledKD, DistillationModule, HardCE, ModelOutputs, SoftTargetKL  # noqa: E402

STUDENT = {"model": "zoo/convnet", "model_kwargs": {"in_chans": 1, "widths": (32, 64, 128)}}
TEACHER = {"teachers": ["pypi/efficientnet_lite0"], "teacher_model_kwargs": {"in_chans": 1}, "untrained_teacher_head": True}


def step_time(module, data_dir: str, steps: int, root: str, with_index: bool = False) -> float:
    """Median step time after 5 warm-up steps."""
    seed_everything(0)
    timer = StepTimer()
    dm = FashionMNIST(data_dir=data_dir, batch_size=128, image_size=32, samples_per_class=200, with_index=with_index)
    trainer = Trainer(max_steps=steps + 5, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, accelerator="cpu", devices=1, callbacks=[timer], default_root_dir=root)
    trainer.fit(module, dm)
    return statistics.median(timer.times[5:])


def make(kind: str, root: str):
    if kind == "alone":
        return Classifier(**STUDENT)
    losses = [SoftTargetKL(weight=0.9, temperature=4.0), HardCE(weight=0.1)]
    if kind == "cached":
        return DistillationModule(**STUDENT, **TEACHER, losses=losses, cache_teacher=True, cache_dir=f"{root}/cache")
    return DistillationModule(**STUDENT, **TEACHER, losses=losses)


def run(kind: str, data_dir: str, steps: int, root: str) -> float:
    return step_time(make(kind, root), data_dir, steps, root, with_index=kind == "cached")  # the cache reads rows by Batch.index


def in_fresh_process(*args) -> float:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run, *args).result()


def softmax64(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kd_reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float, beta: float) -> tuple[float, float]:
    """SoftTargetKL and DecoupledKD by hand, in float64, one sample at a time."""
    kd = dkd = 0.0
    for b in range(len(y)):
        p_s, p_t, c = softmax64(s[b] / T), softmax64(t[b] / T), int(y[b])
        kd += float((p_t * (p_t / p_s).log()).sum())
        bs, bt = torch.stack([p_s[c], 1 - p_s[c]]), torch.stack([p_t[c], 1 - p_t[c]])
        rest = [k for k in range(len(p_s)) if k != c]
        qs, qt = p_s[rest] / p_s[rest].sum(), p_t[rest] / p_t[rest].sum()
        dkd += alpha * float((bt * (bt / bs).log()).sum()) + beta * float((qt * (qt / qs).log()).sum())
    return T * T * kd / len(y), T * T * dkd / len(y)


def kd_loss_max_abs_err() -> float:
    torch.manual_seed(0)
    err = 0.0
    for T in (1.0, 2.0, 4.0, 8.0):
        s, t, y = torch.randn(64, 10) * 3, torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
        ref_kd, ref_dkd = kd_reference(s.double(), t.double(), y, T, 1.0, 8.0)
        got_kd = SoftTargetKL(temperature=T).distill(ModelOutputs(logits=s), [ModelOutputs(logits=t)], y).item()
        got_dkd = DecoupledKD(alpha=1.0, beta=8.0, temperature=T).distill(ModelOutputs(logits=s), [ModelOutputs(logits=t)], y).item()
        err = max(err, abs(got_kd - ref_kd), abs(got_dkd - ref_dkd))
    return err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic malloc thresholds")
    args = parser.parse_args()
    if not args.default_malloc:  # read by glibc at process start: applies to the spawned runs
        os.environ.update({"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(256 << 20)})
    with tempfile.TemporaryDirectory() as root:
        in_fresh_process("cached", args.data_dir, 1, root)  # fills the teacher cache on disk
        times = {"alone": [], "cached": [], "online": []}
        for _ in range(args.rounds):
            for kind in times:
                times[kind].append(in_fresh_process(kind, args.data_dir, args.steps, root))
    best = {k: min(v) for k, v in times.items()}
    err = kd_loss_max_abs_err()
    print(f"\n{'step (batch 128, 1x32x32)':<34}{'ms':>8}{'vs alone':>10}")
    for name, label in (("alone", "student alone (CE)"), ("cached", "KD, cached teacher logits"), ("online", "KD, online EfficientNet-Lite0")):
        print(f"{label:<34}{best[name] * 1e3:>8.1f}{best[name] / best['alone']:>9.2f}x")
    print(f"KD / DKD loss max |float32 - float64 by hand| = {err:.2e}")
    print(json.dumps({
        "cached_step_vs_student_alone": round(best["cached"] / best["alone"], 3),
        "online_step_vs_student_alone": round(best["online"] / best["alone"], 3),
        "kd_loss_max_abs_err": err,
    }))


if __name__ == "__main__":
    main()
