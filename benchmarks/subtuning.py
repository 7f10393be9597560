"""SubTuning vs full finetuning, side by side: a 12-block ViT and EfficientNet-Lite0, last 2 blocks trained.

    python benchmarks/subtuning.py [--batch-size 32] [--steps 6] [--epochs 2] [--data-dir data]

Measures, per model:
  * step_time_vs_full: a SubTuning training step (frozen prefix under no_grad, AdamW on the last
    two blocks and the head) over a full-finetuning step (``zoo.Classifier``, every parameter).
  * peak_mem_vs_full: training memory beyond the (shared) weights, SubTuning over full: bytes of the
    activations autograd saves for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``,
    unique storages, parameters excluded) + gradients + AdamW's two moment buffers. On CPU this is
    the part of peak memory that differs between the two; the activation-only ratio is printed too.
  * cached_epoch_speedup: a Lightning epoch (training batches, then validation) of SubTuning with
    ``cache_frozen_features`` (and the ``SkipCachedInputs`` callback: cached samples load no image) over the
    same epoch without it, after one untimed epoch (the one that
    fills the cache). Data: real Fashion-MNIST in the paper's low-data regime, 100 images per class
    (1,000 training images) with the datamodule's default validation split (6,000 images).
    ``cached_train_batches_speedup`` is the training-batch part alone. Printed beside each part: its
    FLOPs bound, forward FLOPs from ``torch.utils.flop_counter`` and backward taken as twice the
    forward (the counter's grouped-conv backward is not usable). Caching removes the frozen
    prefix's forward and nothing else, so training batches cannot beat
    (prefix + 3 x suffix) / (3 x suffix) by much (x2.67 for the ViT), validation batches
    (prefix + suffix) / suffix.
  * multitask_speedup: 3 tasks finetuned on the last 2 blocks through one ``MultiTaskSubTuned``
    over the 3 models run one after the other (inference, batch 64).
The last line is one JSON object with those five keys, each ``{"vit12": ratio, "efficientnet_lite0": ratio}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import EpochTimer, timed  # noqa: E402

from callbacks.skip_cached_inputs import SkipCachedInputs  # noqa: E402
from datamodules import FashionMNIST  # noqa: E402
from zoo.batch import Batch  # noqa: E402
from zoo.classifier import Classifier  # noqa: E402
from zoo.snnet import FLOP_MAPPING  # noqa: E402
from zoo.subtuning import MultiTaskSubTuned, SubTuningModule, candidate_layers  # noqa: E402

MODELS = {
    "vit12": ("timm/vit_tiny_patch16_224", False, {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3}, 32),
    "efficientnet_lite0": ("pypi/efficientnet_lite0", True, {}, 96),
}


def train_step(module, opt, x, y):
    def step():
        loss = module.criterion(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def memory(module, x, y) -> tuple[int, int]:
    """(saved-activation bytes, gradient + AdamW state bytes) of one training step."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.criterion(module(x), y)
    loss.backward()
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return sum(seen.values()), 3 * trainable  # gradient + exp_avg + exp_avg_sq


def build(name: str, cls, in_chans: int = 3, **kw):
    model, pretrained, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    return cls(model, num_classes=10, pretrained=pretrained, model_kwargs={**kwargs, "in_chans": in_chans}, **kw)


def cached_epochs(name: str, last2: list[str], batch_size: int, data_dir: str, timed_epochs: int) -> list[tuple[float, float, float]]:
    """Median (train, val, epoch) seconds of Lightning epochs without, then with, the cache (first epoch untimed)."""
    result = []
    for cache in (False, True):
        module = build(name, SubTuningModule, in_chans=1, trainable_layers=last2, cache_frozen_features=cache)
        data = FashionMNIST(data_dir, batch_size=batch_size, samples_per_class=100, image_size=MODELS[name][3], with_index=True, download=False)
        timer = EpochTimer()
        callbacks = [timer, SkipCachedInputs()] if cache else [timer]  # cached epochs load no images
        trainer = Trainer(max_epochs=1 + timed_epochs, num_sanity_val_steps=0, callbacks=callbacks, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
        result.append(tuple(statistics.median(e[k] for e in timer.epochs[1:]) for k in range(3)))
    return result


def bench(name: str, batch_size: int, steps: int, data_dir: str, epochs_timed: int) -> dict[str, float]:
    size = MODELS[name][3]
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,))
    full = build(name, Classifier).train()
    last2 = candidate_layers(full.backbone)[-2:]
    sub = build(name, SubTuningModule, trainable_layers=last2).train()
    t_full = timed(train_step(full, torch.optim.AdamW(full.parameters()), x, y), steps, warmup=1)
    t_sub = timed(train_step(sub, torch.optim.AdamW([p for p in sub.parameters() if p.requires_grad]), x, y), steps, warmup=1)
    act_full, state_full = memory(full, x, y)
    act_sub, state_sub = memory(sub, x, y)

    epochs = cached_epochs(name, last2, batch_size, data_dir, epochs_timed)
    (train_plain, val_plain, t_plain), (train_cached, val_cached, t_cached) = epochs

    # FLOPs bounds: caching removes the frozen prefix's forward and nothing else.
    idx = torch.arange(batch_size)
    cached = build(name, SubTuningModule, trainable_layers=last2, cache_frozen_features=True)
    batch = Batch(x, y, index=idx)
    cached.training_loss(batch)  # fills the cache for these samples

    def forward_flops(module) -> int:
        with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
            module.training_loss(batch)
        return counter.get_total_flops()

    suffix, whole = forward_flops(cached), forward_flops(sub)  # sub: the same layers, no cache
    train_bound, val_bound = (whole + 2 * suffix) / (3 * suffix), whole / suffix

    tasks = [build(name, SubTuningModule, trainable_layers=last2).eval() for _ in range(3)]
    for k, task in enumerate(tasks):
        torch.manual_seed(k)
        for p in task.trainable_modules[0].parameters():
            p.data.add_(0.01 * torch.randn_like(p))
    multi = MultiTaskSubTuned(tasks)
    xi = torch.randn(64, 3, size, size)
    with torch.no_grad():
        for got, task in zip(multi(xi), tasks):
            assert torch.allclose(got, task(xi), atol=1e-4)
        t_sep = timed(lambda: [task(xi) for task in tasks], steps, warmup=1)
        t_multi = timed(lambda: multi(xi), steps, warmup=1)

    r = {
        "step_time_vs_full": t_sub / t_full,
        "peak_mem_vs_full": (act_sub + state_sub) / (act_full + state_full),
        "cached_epoch_speedup": t_plain / t_cached,
        "cached_train_batches_speedup": train_plain / train_cached,
        "multitask_speedup": t_sep / t_multi,
    }
    print(f"{name}: trainable {last2}, batch {batch_size}, {size}x{size}")
    print(f"  step      full {t_full * 1e3:7.1f} ms   subtuning {t_sub * 1e3:7.1f} ms   ratio {r['step_time_vs_full']:.3f}")
    print(f"  memory    full {(act_full + state_full) / 2**20:7.1f} MiB  subtuning {(act_sub + state_sub) / 2**20:7.1f} MiB  ratio {r['peak_mem_vs_full']:.3f}"
          f"  (saved activations only: {act_sub / act_full:.3f})")
    print(f"  epoch     uncached {t_plain:6.2f} s   cached {t_cached:6.2f} s   speedup {r['cached_epoch_speedup']:.2f}x")
    print(f"    train   uncached {train_plain:6.2f} s   cached {train_cached:6.2f} s   speedup {r['cached_train_batches_speedup']:.2f}x  (FLOPs bound {train_bound:.2f}x)")
    print(f"    val     uncached {val_plain:6.2f} s   cached {val_cached:6.2f} s   speedup {val_plain / val_cached:.2f}x  (FLOPs bound {val_bound:.2f}x)")
    print(f"  3 tasks   separate {t_sep * 1e3:7.1f} ms   shared {t_multi * 1e3:7.1f} ms   speedup {r['multitask_speedup']:.2f}x")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per cache setting (after one untimed epoch)")
    parser.add_argument("--data-dir", default="data", help="Fashion-MNIST (also found in Debian's dataset-fashion-mnist: make data)")
    args = parser.parse_args()
    results = {name: bench(name, args.batch_size, args.steps, args.data_dir, args.epochs) for name in MODELS}
    keys = ["step_time_vs_full", "peak_mem_vs_full", "cached_epoch_speedup", "multitask_speedup", "cached_train_batches_speedup"]
    print(json.dumps({k: {name: round(r[k], 3) for name, r in results.items()} for k in keys}))


if __name__ == "__main__":
    main()
