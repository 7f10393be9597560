"""Shared test utilities: tiny model settings, CLI runs in a subprocess, DDP runs on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]

# A ViT small enough for tests: 8x8 grayscale digits, 16 tokens, width 32, 2 blocks.
TINY_VIT = "timm/vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


class SaveRankState(Callback):
    """Saves each rank's final ``state_dict`` (and any extra per-rank state) to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state, "global_step": trainer.global_step}, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def run_cli(args: list[str], cwd: Path | str | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python cli.py <args>`` in a subprocess; raise with its output if it fails."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"cli {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_ddp(args: list[str], out_dir: Path, cwd: Path | str | None = None, timeout: int = 300) -> list[dict]:
    """Run ``zoo fit <args>`` with ``strategy=ddp`` on 2 CPU processes (gloo); return each rank's saved state."""
    run_cli(
        ["fit", *args, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.num_nodes=1",
         "--trainer.callbacks+=tests.helpers.SaveRankState", f"--trainer.callbacks.out_dir={out_dir}"],
        cwd=cwd, timeout=timeout, env={"OMP_NUM_THREADS": "1"},
    )
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def tiny_base_checkpoint(path: Path, num_classes: int = 4):
    """A tiny ViT trained one step and saved at ``path`` (the base an adapter starts from), a 16-sample loader of
    random 8x8 images and the Trainer arguments of a quiet run: ``(data, trainer_kwargs)``."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    import zoo
    from zoo.batch import Batch, collate

    data = DataLoader([Batch(inputs=torch.randn(1, 8, 8), targets=torch.tensor(i % num_classes)) for i in range(16)],
                      batch_size=8, collate_fn=collate)
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    base = zoo.Classifier(model=TINY_VIT, model_kwargs=TINY_VIT_KWARGS, num_classes=num_classes)
    Trainer(max_steps=1, **kw).fit(base, data)
    base.trainer.save_checkpoint(path)
    return data, kw


def fit_and_save(module, path: Path, steps: int = 2):
    """Train ``module`` ``steps`` steps on one CPU over 16 random 8x8 images of 4 classes (batches of 8), save the
    checkpoint at ``path``; the Trainer."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from zoo.batch import Batch, collate

    data = [Batch(inputs=torch.randn(1, 8, 8), targets=torch.tensor(i % 4)) for i in range(16)]
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=8, collate_fn=collate))
    trainer.save_checkpoint(path)
    return trainer


# A pair of ranks started as ``torchrun`` would (gloo, one thread each), running a plan of CLI runs in turn: one
# process start-up for many runs. ``plan``: ``[{"cwd": <dir>, "runs": [[cli args], ...]}, ...]``; each rank writes
# ``<cwd>/status{rank}.txt`` ("ok" or the traceback). Used by tests/test_ddp_configs.py and tests/test_sharding.py.

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(module: str, plan: list[dict], root: Path) -> list[subprocess.Popen]:
    """Start two ranks of ``python -m <module> <root>/plan.json`` (its ``__main__`` calls :func:`run_plan`); logs in
    ``root/rank{r}.log``."""
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    return [subprocess.Popen([sys.executable, "-m", module, str(root / "plan.json")], cwd=ROOT,
                             env={**env, "LOCAL_RANK": str(r), "RANK": str(r)}, stdout=open(root / f"rank{r}.log", "w"),
                             stderr=subprocess.STDOUT) for r in range(2)]


def wait_pair(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait up to ``timeout`` seconds for both ranks, kill what is left; their exit codes."""
    import time

    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill(procs)
    return [p.returncode for p in procs]


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def pair_logs(root: Path, chars: int = 4000) -> str:
    return "\n".join(f"--- rank {r}\n{(root / f'rank{r}.log').read_text()[-chars:]}" for r in range(2))


def run_plan(plan_file: str, keep_going: bool) -> None:
    """One rank: every planned item in turn, in its ``cwd`` (relative outputs land there). ``keep_going``: after a failed
    item try the next one (sharded runs leave the process group usable); else stop (DDP's may be unusable)."""
    import time
    import traceback

    from cli import main

    rank = int(os.environ["LOCAL_RANK"])
    sys.argv = sys.argv[:1]  # the CLI reads its arguments from the plan
    for item in json.loads(Path(plan_file).read_text()):
        os.chdir(item["cwd"])
        try:
            for args in item["runs"]:
                t = time.time()
                main(args)
                print(f"[{item['cwd']}] {time.time() - t:.1f}s", flush=True)
        except BaseException:
            Path(item["cwd"], f"status{rank}.txt").write_text(traceback.format_exc())
            if keep_going:
                continue
            raise
        Path(item["cwd"], f"status{rank}.txt").write_text("ok")
