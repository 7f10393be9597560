"""SubTuning vs full finetuning, side by side: a 12-block ViT and EfficientNet-Lite0, last 2 blocks trained.

    python benchmarks/subtuning.py [--batch-size 32] [--steps 6]

Measures, per model:
  * step_time_vs_full: a SubTuning training step (frozen prefix under no_grad, AdamW on the last
    two blocks and the head) over a full-finetuning step (``zoo.Classifier``, every parameter).
  * peak_mem_vs_full: training memory beyond the (shared) weights, SubTuning over full: bytes of the
    activations autograd saves for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``,
    unique storages, parameters excluded) + gradients + AdamW's two moment buffers. On CPU this is
    the part of peak memory that differs between the two; the activation-only ratio is printed too.
  * cached_epoch_speedup: a SubTuning epoch with ``cache_frozen_features`` (cache already filled, as in
    every epoch after the first) over the same epoch without it, on in-memory data. Printed beside it:
    the FLOPs bound (prefix + 3 x suffix) / (3 x suffix), forward FLOPs from ``torch.utils.flop_counter``
    and backward taken as twice the forward (the counter's grouped-conv backward is not usable):
    caching removes the frozen prefix's forward, nothing else, so it cannot beat that ratio by much.
  * multitask_speedup: 3 tasks finetuned on the last 2 blocks through one ``MultiTaskSubTuned``
    over the 3 models run one after the other (inference, batch 64).
The last line is one JSON object with those four keys, each ``{"vit12": ratio, "efficientnet_lite0": ratio}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timed  # noqa: E402
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


def build(name: str, cls, **kw):
    model, pretrained, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    return cls(model, num_classes=10, pretrained=pretrained, model_kwargs=kwargs, **kw)


def bench(name: str, batch_size: int, steps: int) -> dict[str, float]:
    size = MODELS[name][3]
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,))
    full = build(name, Classifier).train()
    last2 = candidate_layers(full.backbone)[-2:]
    sub = build(name, SubTuningModule, trainable_layers=last2).train()
    t_full = timed(train_step(full, torch.optim.AdamW(full.parameters()), x, y), steps, warmup=1)
    t_sub = timed(train_step(sub, torch.optim.AdamW([p for p in sub.parameters() if p.requires_grad]), x, y), steps, warmup=1)
    act_full, state_full = memory(full, x, y)
    act_sub, state_sub = memory(sub, x, y)

    # Epochs over in-memory data, with and without the cache.
    n = 8 * batch_size
    data = torch.randn(n, 3, size, size)
    labels = torch.randint(0, 10, (n,))
    cached = build(name, SubTuningModule, trainable_layers=last2, cache_frozen_features=True).train()
    plain = build(name, SubTuningModule, trainable_layers=last2).train()

    def epoch(module, opt):
        def run():
            for i in range(0, n, batch_size):
                idx = torch.arange(i, min(i + batch_size, n))
                loss = module.training_loss((data[idx], labels[idx], idx))[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return run

    t_plain = timed(epoch(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad])), 2, warmup=1)
    t_cached = timed(epoch(cached, torch.optim.AdamW([p for p in cached.parameters() if p.requires_grad])), 2, warmup=1)  # warm-up epoch fills the cache

    def forward_flops(module) -> int:
        idx = torch.arange(batch_size)
        with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
            module.training_loss((data[idx], labels[idx], idx))
        return counter.get_total_flops()

    suffix = forward_flops(cached)
    flops_bound = (forward_flops(plain) + 2 * suffix) / (3 * suffix)

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
        "multitask_speedup": t_sep / t_multi,
    }
    print(f"{name}: trainable {last2}, batch {batch_size}, {size}x{size}")
    print(f"  step      full {t_full * 1e3:7.1f} ms   subtuning {t_sub * 1e3:7.1f} ms   ratio {r['step_time_vs_full']:.3f}")
    print(f"  memory    full {(act_full + state_full) / 2**20:7.1f} MiB  subtuning {(act_sub + state_sub) / 2**20:7.1f} MiB  ratio {r['peak_mem_vs_full']:.3f}"
          f"  (saved activations only: {act_sub / act_full:.3f})")
    print(f"  epoch     uncached {t_plain:6.2f} s   cached {t_cached:6.2f} s   speedup {r['cached_epoch_speedup']:.2f}x"
          f"  (FLOPs bound {flops_bound:.2f}x)")
    print(f"  3 tasks   separate {t_sep * 1e3:7.1f} ms   shared {t_multi * 1e3:7.1f} ms   speedup {r['multitask_speedup']:.2f}x")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = {name: bench(name, args.batch_size, args.steps) for name in MODELS}
    keys = ["step_time_vs_full", "peak_mem_vs_full", "cached_epoch_speedup", "multitask_speedup"]
    print(json.dumps({k: {name: round(r[k], 3) for name, r in results.items()} for k in keys}))


if __name__ == "__main__":
    main()
