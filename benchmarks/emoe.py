"""EMoE vs the dense FFN, side by side: an FFN of width 3072 on hidden 768, and MiniLM end to end.

    OMP_NUM_THREADS=1 python benchmarks/emoe.py [--tokens 2048] [--repeats 7]
    OMP_NUM_THREADS=1 python benchmarks/emoe.py --smoke      # tiny sizes and a random tiny BERT: checks that it runs

Times are medians over interleaved repeats (dense, EMoE, dense, ...) so that machine noise hits both;
figures are ratios EMoE / dense (< 1: EMoE is faster). The last line is JSON;
``convert_seconds`` is the conversion of the paper's layer with the official k-means (10 restarts, up to 1000 iterations),
``convert_seconds_1init`` the same with one restart (``cluster_inits: 1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.backbones import build_backbone  # noqa: E402
from zoo.emoe import emoe_layers, moefy  # noqa: E402


def interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each function, measured in turn ``repeats`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def ffn_benchmark(tokens: int, repeats: int, dim: int = 768) -> tuple[dict[str, float], float]:
    torch.manual_seed(0)
    from timm.layers import Mlp

    dense = Mlp(dim, 4 * dim).eval()  # the dense baseline: timm's ViT FFN (fc1, GELU, fc2)
    x = torch.randn(tokens, dim)
    models = {"dense": dense}
    for n, k in ((4, 1), (4, 4), (64, 16)):
        models[f"{k}of{n}"] = moefy(dense, num_experts=n, top_k=k, cluster_inits=1).eval()
    with torch.no_grad():
        diff = (models["4of4"](x) - dense(x)).abs().max().item()
        times = interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats)
    print(f"FFN {dim} -> {4 * dim} -> {dim}, {tokens} tokens, forward (no grad):")
    for name, t in times.items():
        print(f"  {name:>6}: {t * 1e3:8.2f} ms   x{t / times['dense']:.3f} of dense")
    return {k: times[k] / times["dense"] for k in times}, diff


def minilm_benchmark(batch: int, seq: int, repeats: int, smoke: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    if smoke:  # a random tiny BERT of MiniLM's depth
        dense = build_backbone("hf/bert", hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=128, vocab_size=30000)
    else:
        dense = build_backbone("pypi/all-MiniLM-L6-v2", pretrained=True)
    start = time.perf_counter()
    emoe = moefy(dense, num_experts=64, top_k=16, layers=[4])  # the paper's BERT setting (layer 10 of 12), official k-means
    convert = time.perf_counter() - start
    start = time.perf_counter()
    moefy(dense, num_experts=64, top_k=16, layers=[4], cluster_inits=1)
    convert_1init = time.perf_counter() - start
    start = time.perf_counter()
    every = moefy(dense, num_experts=64, top_k=64, cluster_inits=1)
    convert_all = time.perf_counter() - start
    inputs = {"input_ids": torch.randint(1000, 29000, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    with torch.no_grad():
        diff = (every.eval()(inputs) - dense.eval()(inputs)).abs().max().item()
    width = dense.model.config.hidden_size if hasattr(dense, "model") else 384
    heads = {name: nn.Linear(width, 6) for name in ("dense", "emoe")}
    steps = {}
    for name, body in (("dense", dense), ("emoe", emoe)):
        body.train()
        params = list(body.parameters()) + list(heads[name].parameters())
        opt = torch.optim.AdamW(params, lr=1e-5)
        labels = torch.randint(0, 6, (batch,))

        def step(body=body, head=heads[name], opt=opt, labels=labels):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(head(body(inputs)), labels)
            loss.backward()
            opt.step()

        steps[name] = step
    times = interleaved(steps, repeats)
    print(f"MiniLM (all-MiniLM-L6-v2), batch {batch} x {seq} tokens, finetuning step (fwd + bwd + AdamW):")
    print(f"  dense: {times['dense'] * 1e3:.1f} ms   EMoE (layer 4, 64 experts, top-16): {times['emoe'] * 1e3:.1f} ms   x{times['emoe'] / times['dense']:.3f}")
    print(f"  conversion: {convert:.2f} s for the paper's layer (official k-means, 10 restarts), {convert_1init:.2f} s with 1 restart, "
          f"{convert_all:.2f} s for all {len(emoe_layers(every))} layers (1 restart)")
    print(f"  all 6 layers at k = N vs dense: max |diff| = {diff:.2e}")
    return {"train_step_vs_dense": times["emoe"] / times["dense"], "convert_seconds": convert, "convert_seconds_1init": convert_1init, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per FFN forward")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a random tiny BERT (seconds): checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.repeats, args.batch, args.seq = 64, 1, 2, 8
    ratios, ffn_diff = ffn_benchmark(args.tokens, args.repeats, dim=64 if args.smoke else 768)
    lm = minilm_benchmark(args.batch, args.seq, 1 if args.smoke else max(3, args.repeats // 2), smoke=args.smoke)
    print(json.dumps({
        "ffn_fwd_vs_dense_k1of4": round(ratios["1of4"], 4),
        "ffn_fwd_vs_dense_kNofN": round(ratios["4of4"], 4),
        "train_step_vs_dense": round(lm["train_step_vs_dense"], 4),
        "ffn_fwd_vs_dense_64e_k16": round(ratios["16of64"], 4),
        "dense_equiv_max_abs_diff": max(ffn_diff, lm["diff"]),
        "convert_seconds": round(lm["convert_seconds"], 3),
        "convert_seconds_1init": round(lm["convert_seconds_1init"], 3),
    }))


if __name__ == "__main__":
    main()
