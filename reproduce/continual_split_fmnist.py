"""Continual learning with replay at small scale: class-incremental Split Fashion-MNIST (real data).

5 tasks x 2 classes, one epoch per task, an MLP (784-256-256-10), SGD, batch 32, buffer of 500 samples.
Claims checked: ER >> fine-tuning in final average accuracy; DER++ >= ER; k-FPF >= ER at lower cost.
Joint training on all data seen is the upper bound. `er_cnn` / `kfpf_cnn` repeat ER vs k-FPF on a small BatchNorm CNN
(the paper's forgetting-prone modules: BatchNorm + last layer). Cost is wall time and the number of samples passed
forward+backward through the network (current batches + replayed batches + FPF batches), relative to fine-tuning.

    OMP_NUM_THREADS=2 python reproduce/continual_split_fmnist.py [--methods finetune er derpp kfpf joint] [--seeds 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from callbacks.continual_metrics import stream_metrics
from datamodules import FashionMNIST
from datamodules.continual import ContinualDataModule
from zoo.continual import ER, KFPF, DarkReplay, DERpp, FineTune, Joint, ReplayTerm

MLP = {"model": "zoo/mlp", "model_kwargs": {"img_size": 28, "hidden": [256, 256]}}
CNN = {"model": "zoo/convnet", "model_kwargs": {"widths": [16, 32, 64]}}
KFPF_ARGS = {"buffer_size": 500, "replay_batch_size": 32, "fpf_every": 200, "fpf_steps": 100}
BUFFER, REPLAY_BATCH, BATCH, LR = 500, 32, 32, 0.05
METHODS = {
    "finetune": lambda: FineTune(**MLP),
    "er": lambda: ER(**MLP, buffer_size=BUFFER, replay_batch_size=REPLAY_BATCH),
    "derpp": lambda: DERpp(**MLP, buffer_size=BUFFER, replay_batch_size=REPLAY_BATCH, alpha=0.2, beta=0.5),
    # k-FPF: no per-step replay; every 200 steps (and at task ends) 100 SGD steps on the buffer for the forgetting-prone modules
    "kfpf": lambda: KFPF(**MLP, **KFPF_ARGS, fpf_lr=0.01, fpf_modules=["head"]),
    "kfpf_last2": lambda: KFPF(**MLP, **KFPF_ARGS, fpf_lr=0.01, fpf_modules=["head", "backbone.layers.3"]),
    "kfpf_drift": lambda: KFPF(**MLP, **KFPF_ARGS, fpf_lr=0.05, fpf_num_modules=2),  # the 2 modules of largest measured drift
    "kfpf_kd": lambda: KFPF(**MLP, **KFPF_ARGS, fpf_lr=0.05, fpf_num_modules=2, fpf_alpha=0.3),  # k-FPF-KD
    "joint": lambda: Joint(**MLP),
    # the paper's setting: a CNN whose forgetting-prone modules are its BatchNorm layers + the last layer
    "er_cnn": lambda: ER(**CNN, buffer_size=BUFFER, replay_batch_size=REPLAY_BATCH),
    "kfpf_cnn": lambda: KFPF(**CNN, **KFPF_ARGS, fpf_lr=0.05, fpf_modules=["BatchNorm2d", "head"]),
}


class CountPasses(Callback):
    """Samples passed forward+backward: current batches, replay draws (per replay term) and FPF draws."""

    def __init__(self):
        self.samples = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        draws = sum(2 if isinstance(t, DarkReplay) and t.beta else 1 for t in module.losses if isinstance(t, ReplayTerm))
        replayed = draws * module.hparams.replay_batch_size if module.buffer is not None and len(module.buffer) else 0
        self.samples += len(batch) + replayed
        if isinstance(module, KFPF) and module.global_step % module.hparams.fpf_every == 0:
            self.samples += module.hparams.fpf_steps * module.hparams.replay_batch_size

    def on_train_epoch_start(self, trainer, module):  # a task end just passed: FPF ran there too
        if module.hparams.fpf_steps and trainer.current_epoch and trainer.current_epoch % module.stream.epochs_per_task == 0:
            self.samples += module.hparams.fpf_steps * module.hparams.replay_batch_size

    def on_train_end(self, trainer, module):
        self.on_train_epoch_start(trainer, module)


def run_method(name: str, seed: int = 0, data_dir: str = "data") -> dict:
    """Train one method on the whole stream; return its final metrics and cost."""
    seed_everything(seed, verbose=False)
    module = METHODS[name]()
    module.optimizer = lambda params: torch.optim.SGD(params, lr=LR)
    stream = ContinualDataModule(FashionMNIST(data_dir=data_dir, batch_size=BATCH, val_fraction=0.05, download=False, seed=seed),
                                 classes_per_task=2, class_order_seed=seed if seed else None, cumulative=isinstance(module, Joint))
    counter = CountPasses()
    trainer = Trainer(max_epochs=stream.num_tasks, reload_dataloaders_every_n_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[counter])
    start = time.perf_counter()
    trainer.fit(module, stream)
    seconds = time.perf_counter() - start
    return {**stream_metrics(module.acc_matrix), "seconds": seconds, "samples": counter.samples, "matrix": module.acc_matrix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {}
    for m in args.methods:
        results[m] = [run_method(m, s, args.data_dir) for s in args.seeds]
        r = results[m][-1]
        print(f"{m}: avg acc {r['avg_acc']:.4f}, forgetting {r['forgetting']:.4f}, {r['seconds'] / 60:.2f} min", flush=True)
    base = results.get("finetune")
    print(f"\nClass-incremental Split Fashion-MNIST, 5 tasks x 2 classes, MLP, buffer {BUFFER}, seeds {args.seeds}")
    print(f"{'method':10s} {'avg acc':>8s} {'forgetting':>11s} {'BWT':>8s} {'minutes':>8s} {'fwd+bwd samples':>16s} {'x finetune':>11s}")
    for m, runs in results.items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in ("avg_acc", "forgetting", "bwt", "seconds", "samples")}
        rel = mean["samples"] / statistics.mean(r["samples"] for r in base) if base else float("nan")
        print(f"{m:10s} {mean['avg_acc']:8.4f} {mean['forgetting']:11.4f} {mean['bwt']:+8.4f} {mean['seconds'] / 60:8.2f} {mean['samples']:16,.0f} {rel:11.2f}")
    for m, runs in results.items():
        print(f"\naccuracy matrix, {m} (seed {args.seeds[0]}):\n{runs[0]['matrix'].numpy().round(3)}")


if __name__ == "__main__":
    main()
