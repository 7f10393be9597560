"""Memory held per rank and step time of sharded training (FSDP2 via Lightning's ``ModelParallelStrategy``, the
zoo's ``Classifier.configure_model`` sharding each block, see zoo/sharding.py) against DDP (issue 18).

Side by side in one run: one pair of CPU processes (gloo, ``OMP_NUM_THREADS=1``, started as ``torchrun`` starts
them) trains the same ViT (timm, 12 blocks, width 128, 64 tokens; the same initial weights) on the same data
(in-memory tensors, batch 16 per rank, AdamW) under DDP and under sharding, alternating, ``REPEATS`` times each.
At the end of each run every rank counts the bytes it holds in parameters, gradients and optimizer state (the local
shard of a DTensor, the whole tensor otherwise); the step time is the median over the steps after a warm-up
(batch start to batch end, rank 0; both ranks wait for each other in the collectives).

Last line: JSON with ``param_bytes_per_rank_vs_ddp`` (parameter + gradient + optimizer-state bytes of the rank that
holds most under sharding over the same under DDP; goal <= 0.55) and ``sharded_step_vs_ddp`` (step time ratio, for
reference). ``--smoke`` runs a few steps, to check that the script works (its times mean nothing).

    python benchmarks/sharding.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 128, "depth": 12, "num_heads": 4}
BATCH, STEPS, WARMUP, REPEATS = 16, 20, 5, 2
MODES = ("ddp", "sharded")


def held_bytes(module, optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradients and optimizer state (a DTensor's local shard only)."""
    from torch.distributed.tensor import DTensor

    def size(t) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(module.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel")]
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for v in state)}


def worker(out: str, smoke: bool) -> None:
    """One rank: DDP and sharded runs, alternating; writes ``rank{r}.json`` (bytes and step times per run)."""
    import torch
    from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import StepTimer
    from zoo.classifier import Classifier

    steps, warmup, repeats = (3, 1, 1) if smoke else (STEPS, WARMUP, REPEATS)

    class Data(LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            n = 2 * BATCH * (steps + warmup)
            return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=BATCH)

    class Held(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.bytes = held_bytes(pl_module, trainer.optimizers[0])

    rank, runs = int(os.environ["RANK"]), []
    for _ in range(repeats):
        for mode in MODES:
            seed_everything(0, verbose=False)
            model = Classifier(model="timm/vit_tiny_patch16_224", num_classes=10, model_kwargs=MODEL_KWARGS)
            strategy = DDPStrategy() if mode == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
            timer, held = StepTimer(), Held()
            trainer = Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy=strategy, max_steps=steps + warmup, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                              limit_val_batches=0, callbacks=[timer, held])
            trainer.fit(model, Data())
            runs.append({"mode": mode, "bytes": held.bytes, "step_s": statistics.median(timer.times[warmup:]),
                         "sharded_params": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
                         "numel": sum(p.numel() for p in model.parameters())})
    Path(out, f"rank{rank}.json").write_text(json.dumps(runs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps: checks the script, measures nothing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.smoke)
        return
    out = tempfile.mkdtemp(prefix="zoo_bench_sharding_")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "NODE_RANK": "0"}
    cmd = [sys.executable, __file__, "--worker", out, *(["--smoke"] if args.smoke else [])]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=open(Path(out, f"rank{r}.log"), "w"),
                              stderr=subprocess.STDOUT) for r in range(2)]
    if any(p.wait() != 0 for p in procs):
        sys.exit(f"a rank failed; logs in {out}:\n" + Path(out, "rank0.log").read_text()[-3000:] + Path(out, "rank1.log").read_text()[-3000:])
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]

    def total(run: dict) -> int:
        return sum(run["bytes"].values())

    def per_mode(mode: str, key) -> list:
        return [[key(run) for run in runs if run["mode"] == mode] for runs in ranks]

    held = {m: max(max(v) for v in per_mode(m, total)) for m in MODES}  # the rank holding most, its largest count
    step = {m: statistics.median(per_mode(m, lambda run: run["step_s"])[0]) for m in MODES}
    first = {m: next(run for run in ranks[0] if run["mode"] == m) for m in MODES}
    print(f"ViT {MODEL_KWARGS['depth']} blocks, width {MODEL_KWARGS['embed_dim']}, {first['ddp']['numel'] / 1e6:.2f} M parameters, "
          f"2 CPU processes (gloo), batch {BATCH} per rank, AdamW")
    for m in MODES:
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in first[m]["bytes"].items())
        print(f"{m:8} per rank: {held[m] / 2**20:.2f} MiB held ({parts} MiB on rank 0; {first[m]['sharded_params']} DTensor parameters), "
              f"{step[m] * 1000:.1f} ms/step")
    ratio, slow = held["sharded"] / held["ddp"], step["sharded"] / step["ddp"]
    print(f"sharded / DDP: bytes held per rank {ratio:.3f}x (goal <= 0.55), step time {slow:.3f}x"
          + ("   [--smoke: times mean nothing]" if args.smoke else ""))
    print(json.dumps({"param_bytes_per_rank_vs_ddp": round(ratio, 4), "sharded_step_vs_ddp": round(slow, 4), "smoke": args.smoke}))


if __name__ == "__main__":
    main()
