"""ER vs DER vs DER++ with Mammoth's best arguments (Buzzega et al., NeurIPS 2020, Table 2, Seq-MNIST, buffer 500).

``--setting mammoth`` (default) runs the presets ``configs/continual/{er,der,derpp}_seq_mnist.yaml`` (Mammoth
``utils/best_args.py``: batch 10, 1 epoch per task, SGD without momentum; ER lr 0.1 minibatch 10; DER lr 0.03
minibatch 128 alpha 1.0; DER++ lr 0.03 minibatch 10 alpha 1.0 beta 0.5) with Mammoth's network and inputs:
``mnistmlp`` 784-100-100-10 with Xavier-uniform weights and zero biases, pixels in [0, 1] (ToTensor only).
``--setting issue`` is issue 16 item 22's run (MLP 784-256-256-10, SGD lr 0.05 momentum 0.9, batch 64, 64
replayed, normalized inputs; ER ``combine: sum``, DER alpha 0.1, DER++ alpha 0.1 beta 0.5), and ``--variant``
(for either setting) changes one thing at a time to find what put DER below ER. Class-incremental, 5 tasks x 2 classes.
MNIST itself cannot be downloaded on the project's machines; ``--data fmnist`` (default) runs Fashion-MNIST.

    OMP_NUM_THREADS=1 python reproduce/continual_seq_mnist.py [--setting mammoth] [--methods er der derpp] [--seeds 0 1 2 3 4]

Measured (Fashion-MNIST, seeds 0-4, final average accuracy): Mammoth's args ER 0.764 ± 0.028, DER 0.805 ± 0.005,
DER++ 0.810 ± 0.006; DER with alpha 0.1 instead of 1.0: 0.752 ± 0.023 (below ER). Issue setting: DER (alpha 0.1)
0.731 ± 0.026, with alpha 1.0 0.780 ± 0.012; ER ``combine: sum`` diverged in 3 of 5 seeds, ``concat`` 0.748 ± 0.012.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from callbacks.continual_metrics import stream_metrics
from datamodules import MNIST, FashionMNIST
from datamodules.continual import ContinualDataModule

ROOT = Path(__file__).resolve().parents[1]


class RawFashionMNIST(FashionMNIST):
    """Pixels in [0, 1], no normalization (Mammoth's seq-mnist transform is ToTensor only)."""

    mean, std = (0.0,), (1.0,)


class RawMNIST(MNIST):
    mean, std = (0.0,), (1.0,)


def preset(method: str) -> dict:
    """The Mammoth preset of ``method``: class, init args, lr and batch size, read from configs/continual/."""
    conf = yaml.safe_load((ROOT / "configs" / "continual" / f"{method}_seq_mnist.yaml").read_text())
    args = dict(conf["model"]["init_args"])
    lr = args.pop("optimizer")["init_args"]["lr"]
    module, name = conf["model"]["class_path"].rsplit(".", 1)
    return {"cls": getattr(importlib.import_module(module), name), "args": args, "lr": lr, "momentum": 0.0,
            "batch_size": conf["data"]["init_args"]["data"]["init_args"]["batch_size"], "xavier": True, "raw": True}


def issue_setting(method: str) -> dict:
    """Issue 16 item 22's run (what the old defaults gave)."""
    from zoo.continual import DER, ER, DERpp
    from zoo.continual.replay import ExperienceReplay
    from zoo.losses import CrossEntropy

    common = {"model": "zoo/mlp", "model_kwargs": {"img_size": 28, "hidden": [256, 256]}, "buffer_size": 500, "replay_batch_size": 64}
    cls, args = {"er": (ER, {"losses": [CrossEntropy(), ExperienceReplay(combine="sum")]}), "der": (DER, {"alpha": 0.1}),
                 "derpp": (DERpp, {"alpha": 0.1, "beta": 0.5})}[method]
    return {"cls": cls, "args": {**common, **args}, "lr": 0.05, "momentum": 0.9, "batch_size": 64, "xavier": False, "raw": False}


def _er_combine(spec: dict, method: str, combine: str) -> dict:
    if method != "er":
        return spec
    from zoo.continual.replay import ExperienceReplay
    from zoo.losses import CrossEntropy

    return {**spec, "args": {**spec["args"], "losses": [CrossEntropy(), ExperienceReplay(combine=combine)]}}


def _alpha(spec: dict, method: str, alpha: float) -> dict:
    return {**spec, "args": {**spec["args"], "alpha": alpha}} if method != "er" else spec


def _replace(spec: dict, method: str) -> dict:
    """Draws with replacement (the draw before issue 16 item 19)."""
    from zoo.continual.replay import DarkReplay, ExperienceReplay
    from zoo.losses import CrossEntropy

    a = spec["args"]
    old = next((t for t in a.get("losses", []) if isinstance(t, ExperienceReplay)), None)
    term = (ExperienceReplay(replace=True, combine=old.combine if old else "concat") if method == "er" else
            DarkReplay(alpha=a["alpha"], beta=a.get("beta", 0.0), replace=True))
    return {**spec, "args": {**a, "losses": [CrossEntropy(), term]}}


# one change at a time to a setting
VARIANTS = {
    "none": lambda s, m: s,
    "alpha1": lambda s, m: _alpha(s, m, 1.0),  # Mammoth's seq-mnist alpha
    "alpha01": lambda s, m: _alpha(s, m, 0.1),  # the issue's alpha
    "no_momentum": lambda s, m: {**s, "momentum": 0.0},
    "er_concat": lambda s, m: _er_combine(s, m, "concat"),  # Mammoth er.py (the default now)
    "er_sum": lambda s, m: _er_combine(s, m, "sum"),  # the former ER: the draw weighs (B + M) / B times more
    "replace": _replace,
}


def xavier_(module: torch.nn.Module) -> None:
    """Mammoth ``backbone/__init__.py`` ``xavier``: Xavier-uniform (gain 1) Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)


def run(method: str, seed: int, setting: str, variant: str, data: str, data_dir: str, limit: int | None) -> dict:
    spec = VARIANTS[variant](preset(method) if setting == "mammoth" else issue_setting(method), method)
    seed_everything(seed, verbose=False)
    module = spec["cls"](**spec["args"], seed=seed)
    module.configure_model()
    if spec["xavier"]:
        xavier_(module)
    lr, momentum = spec["lr"], spec["momentum"]
    module.optimizer = lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)
    data_cls = {"fmnist": (RawFashionMNIST, FashionMNIST), "mnist": (RawMNIST, MNIST)}[data][0 if spec["raw"] else 1]
    stream = ContinualDataModule(data_cls(data_dir=data_dir, batch_size=spec["batch_size"], val_fraction=0.0, download=data == "mnist", seed=seed),
                                 classes_per_task=2, class_order_seed=None)
    trainer = Trainer(max_epochs=stream.num_tasks, reload_dataloaders_every_n_epochs=1, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, limit_train_batches=limit)
    start = time.perf_counter()
    trainer.fit(module, stream)
    R = module.acc_matrix
    final = R[-1]
    return {**stream_metrics(R), "seconds": time.perf_counter() - start, "old": final[:-1].mean().item(), "new": final[-1].item(), "matrix": R}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["mammoth", "issue"], default="mammoth")
    parser.add_argument("--variant", choices=list(VARIANTS), default="none", help="one change to the setting")
    parser.add_argument("--methods", nargs="+", default=["er", "der", "derpp"], choices=["er", "der", "derpp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", choices=["fmnist", "mnist"], default="fmnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--limit", type=int, default=None, help="training batches per task (timing runs)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {}
    for m in args.methods:
        results[m] = []
        for s in args.seeds:
            r = run(m, s, args.setting, args.variant, args.data, args.data_dir, args.limit)
            results[m].append(r)
            print(f"{m} seed {s}: avg acc {r['avg_acc']:.4f} (old tasks {r['old']:.4f}, last task {r['new']:.4f}), "
                  f"forgetting {r['forgetting']:.4f}, {r['seconds'] / 60:.2f} min", flush=True)
    print(f"\n{args.setting} setting (variant {args.variant}), class-IL Seq-{args.data}, buffer 500, seeds {args.seeds}")
    print(f"{'method':8s} {'avg acc':>16s} {'old tasks':>16s} {'last task':>16s} {'forgetting':>11s}")
    for m, runs in results.items():
        def ms(k):
            v = [r[k] for r in runs]
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
        print(f"{m:8s} {ms('avg_acc'):>16s} {ms('old'):>16s} {ms('new'):>16s} {statistics.mean(r['forgetting'] for r in runs):11.4f}")


if __name__ == "__main__":
    main()
