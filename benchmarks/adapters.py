"""Full finetuning vs LoRA vs E3VA, side by side in one run on a 12-block ViT (issue 19): step time, peak training
memory, and how exactly LoRA merges into a plain model.

The same ViT (timm, 12 blocks, width 128, 64 tokens + class token; the same initial weights), the same data (random
tensors, batch 16, 10 classes) and optimizer (AdamW, lr 1e-3, over the trainable parameters) for three
``zoo.Classifier`` modules: no surgery (full finetuning), ``zoo.adapters.LoRA`` (rank 8 in the attention and FFN
linears of every block) and ``zoo.adapters.e3va.E3VA`` (rank 16). Training step = forward, cross-entropy, backward,
optimizer step (a plain loop, so nothing but the model differs).

* Step time: median over ``STEPS`` steps after ``WARMUP`` untimed ones, the three modes alternating, ``REPEATS``
  rounds (each mode's median of its rounds' medians).
* Peak training memory (CPU: the allocator keeps no peak, so it is counted, the same way for all three): bytes of
  the parameters + the tensors autograd saved for backward at the end of the forward (every storage once, found by
  ``torch.autograd.graph.saved_tensors_hooks``; parameters not counted twice) + the gradients + the optimizer state.
  That is the memory held when backward starts plus what backward and the step add, an upper bound of the peak;
  the saved activations are what E3VA removes (no block activation of the frozen backbone is kept).
* LoRA merge: after the timed LoRA steps (so the adapters are non-zero), the largest absolute difference between
  the module's eval outputs before and after ``unload_surgery`` (``peft``'s ``merge_and_unload``: a plain ViT).

Last line: JSON with ``lora_step_vs_full``, ``lora_peak_mem_vs_full``, ``e3va_step_vs_full`` (goal <= 0.75),
``e3va_peak_mem_vs_full`` (goal <= 0.5) and ``lora_merge_max_abs_diff`` (goal <= 1e-5). ``--smoke`` runs a tiny
ViT for a few steps, to check that the script works (its figures mean nothing).

    OMP_NUM_THREADS=1 python benchmarks/adapters.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.classifier import Classifier  # noqa: E402

MODES = ("full", "lora", "e3va")
MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 128, "depth": 12, "num_heads": 4}
SMOKE_KWARGS = {"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2}
BATCH, STEPS, WARMUP, REPEATS = 16, 10, 3, 3


def surgery(mode: str) -> list:
    from zoo.adapters import LoRA
    from zoo.adapters.e3va import E3VA

    return {"full": [], "lora": [LoRA(parts=["attention", "ffn"], r=8, alpha=16)], "e3va": [E3VA(rank=16)]}[mode]


def make(mode: str, kwargs: dict) -> tuple[Classifier, torch.optim.Optimizer]:
    """The module (same initial weights for every mode) with its surgery applied, and its optimizer."""
    torch.manual_seed(0)
    module = Classifier(model="timm/vit_tiny_patch16_224", num_classes=10, model_kwargs=kwargs, surgery=surgery(mode))
    module.configure_model()
    module.train()
    return module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)


def step(module: Classifier, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(module(x), y).backward()
    optimizer.step()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory(module: Classifier, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """One training step, counted: parameters, saved activations (each storage once), gradients, optimizer state."""
    params = list(module.parameters())
    own = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(module(x), y)
    activations = sum(saved.values())
    loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    out = {"params": nbytes(params), "activations": activations, "grads": nbytes(p.grad for p in params if p.grad is not None),
           "optimizer": nbytes(state)}
    out["total"] = sum(out.values())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny ViT, a few steps: checks the script, figures mean nothing")
    args = parser.parse_args(argv)
    kwargs = SMOKE_KWARGS if args.smoke else MODEL_KWARGS
    steps, warmup, repeats = (2, 1, 1) if args.smoke else (STEPS, WARMUP, REPEATS)
    g = torch.Generator().manual_seed(0)
    size = kwargs["img_size"]
    x = torch.randn(BATCH, 3, size, size, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)

    runs = {m: make(m, kwargs) for m in MODES}
    memory = {m: peak_memory(*runs[m], x, y) for m in MODES}
    trained = {m: sum(p.numel() for p in runs[m][0].parameters() if p.requires_grad) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for m in MODES:
            module, optimizer = runs[m]
            for _ in range(warmup):
                step(module, optimizer, x, y)
            per_step = []
            for _ in range(steps):
                start = time.perf_counter()
                step(module, optimizer, x, y)
                per_step.append(time.perf_counter() - start)
            times[m].append(statistics.median(per_step))
    step_s = {m: statistics.median(times[m]) for m in MODES}

    lora = runs["lora"][0].eval()
    with torch.no_grad():
        adapted = lora(x)
        lora.unload_surgery()
        merged = lora(x)
    merge_diff = (merged - adapted).abs().max().item()

    for m in MODES:
        mem = memory[m]
        print(f"{m:5s} trained params {trained[m]:>9,d}  step {step_s[m] * 1e3:8.1f} ms  peak memory {mem['total'] / 2**20:7.2f} MiB "
              f"(params {mem['params'] / 2**20:.2f}, activations {mem['activations'] / 2**20:.2f}, grads {mem['grads'] / 2**20:.2f}, "
              f"optimizer {mem['optimizer'] / 2**20:.2f})")
    print(f"LoRA merge (peft merge_and_unload) max abs diff of the outputs: {merge_diff:.2e}")
    result = {
        "lora_step_vs_full": round(step_s["lora"] / step_s["full"], 3),
        "lora_peak_mem_vs_full": round(memory["lora"]["total"] / memory["full"]["total"], 3),
        "e3va_step_vs_full": round(step_s["e3va"] / step_s["full"], 3),
        "e3va_peak_mem_vs_full": round(memory["e3va"]["total"] / memory["full"]["total"], 3),
        "lora_merge_max_abs_diff": float(f"{merge_diff:.3e}"),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
