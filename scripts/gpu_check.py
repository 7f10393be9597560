"""``make gpu-check``: every technique for a few steps on all visible GPUs, under DDP and sharded (FSDP2 via
Lightning's ``ModelParallelStrategy``, configs/strategies/), in float32 and bf16-mixed; one line per run.

Each technique runs its main shipped config (tiny models and stand-in data from tests/standin.py, the same set-up
as tests/test_ddp_configs.py and tests/test_sharding.py) with ``zoo fit`` for a few steps. One group of processes
(one per device, started as ``torchrun`` starts them, logs in ``--out``) runs every case in turn, so imports are
paid once; a case that fails or hangs (``--timeout``) ends the group, and a new group goes on with the next case.
A run is ``ok`` when it trained (``global_step > 0``) and every logged metric is finite; otherwise the line says
``FAILED`` with the last line of the error. Without CUDA it says so and exits 0; with failures it exits 1.

    python scripts/gpu_check.py                                   # CUDA, all visible GPUs (make gpu-check)
    python scripts/gpu_check.py --accelerator cpu --devices 2 --techniques classifier   # the same on CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHRINK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=8"]
CONTINUAL = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",  # crosses a task end
             "--data.init_args.epochs_per_task=1", "--data.init_args.data.init_args.batch_size=4"]
# technique -> (main config, CLI arguments for a short run, extra CLI arguments under DDP, extra under sharding)
TECHNIQUES = {
    "classifier": ("quickstart.yaml", SHRINK, [], []),
    "distillation": ("distill/vit_to_small_vit.yaml", SHRINK, [], []),
    # DDP: one stitch per rank and step (official); sharded: every rank runs the same stitch (a block is gathered by all)
    "snnet": ("snnet/stitch.yaml", [*SHRINK, "--callbacks.sweep.init_args.latency_repeats=1"],
              ["--trainer.strategy.init_args.find_unused_parameters=true"], ["--model.init_args.sample_per_rank=false"]),
    "subtuning": ("subtuning/lite0_fmnist.yaml", SHRINK, [], []),
    "emoe": ("emoe/vit_fmnist.yaml", SHRINK, [], []),
    "continual_er": ("continual/er_split_fmnist.yaml", CONTINUAL, [], []),
    "pruning": ("pruning/vit_fmnist_gradual.yaml", [*SHRINK, "--callbacks.pruning.init_args.schedule.init_args.start=0",
                                                   "--callbacks.pruning.init_args.schedule.init_args.end=2",
                                                   "--callbacks.pruning.init_args.schedule.init_args.frequency=1"], [], []),
}
STRATEGIES = ("ddp", "sharded")
PRECISIONS = ("32-true", "bf16-mixed")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.num_sanity_val_steps=0", "--trainer.num_nodes=1"]
COLLECTIVE = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|nccl|gloo", re.IGNORECASE)


def case_args(technique: str, strategy: str, precision: str, accelerator: str, devices: int, timeout: int, standin: Path,
              run_dir: Path) -> list[str]:
    """The ``zoo fit`` arguments of one case: the technique's config on stand-in data, then the strategy's."""
    import yaml

    from tests.standin import point_data_dirs, standin_args

    config, short, ddp_extra, sharded_extra = TECHNIQUES[technique]
    text = (ROOT / "configs" / config).read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(standin))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(conf))
    pg_timeout = f"--trainer.strategy.init_args.timeout={timeout // 3600}:{timeout // 60 % 60:02d}:{timeout % 60:02d}"  # H:MM:SS
    if strategy == "ddp":
        how = ["--trainer.strategy=lightning.pytorch.strategies.DDPStrategy", pg_timeout, *ddp_extra]
    else:
        snippet = ROOT / "configs" / "strategies" / ("sharded_cpu.yaml" if accelerator == "cpu" else "sharded_gpu.yaml")
        how = ["--config", str(snippet), f"--trainer.strategy.init_args.data_parallel_size={devices}", pg_timeout, *sharded_extra]
    return ["fit", "--config", str(run_dir / "config.yaml"), *standin_args(text), *short, *how, *QUIET,
            f"--trainer.accelerator={'cpu' if accelerator == 'cpu' else 'gpu'}", f"--trainer.devices={devices}",
            f"--trainer.precision={precision}"]


# -- one rank ------------------------------------------------------------------------------------------------------
def worker(plan_file: str) -> None:
    """One rank: every planned case in turn; stops at the first failure (the process group may be unusable then)."""
    import torch

    from cli import main

    rank = int(os.environ["RANK"])
    sys.argv = sys.argv[:1]
    for item in json.loads(Path(plan_file).read_text()):
        run_dir = Path(item["dir"])
        os.chdir(run_dir)  # relative outputs (runs/, checkpoints/) land in the case's own folder
        (run_dir / f"started{rank}").write_text(str(time.time()))
        try:
            trainer = main(item["args"]).trainer
            bad = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and not math.isfinite(float(v))}
            if trainer.global_step == 0 or bad:
                raise RuntimeError(f"trained {trainer.global_step} steps; metrics not finite: {bad}")
        except BaseException:
            (run_dir / f"status{rank}.txt").write_text(traceback.format_exc())
            raise
        (run_dir / f"status{rank}.txt").write_text("ok")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the launcher ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: list[dict], devices: int, out: Path, k: int) -> list[subprocess.Popen]:
    """``devices`` ranks running ``plan``, started together as ``torchrun`` would; logs in ``out/group{k}_rank{r}.log``."""
    (out / f"plan{k}.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(devices), "NODE_RANK": "0"}
    return [subprocess.Popen([sys.executable, __file__, "--worker", str(out / f"plan{k}.json")], cwd=ROOT,
                             env={**env, "LOCAL_RANK": str(r), "RANK": str(r)}, stdout=open(out / f"group{k}_rank{r}.log", "w"),
                             stderr=subprocess.STDOUT) for r in range(devices)]


def where(text: str) -> str:
    """The innermost frame of a traceback in this repository's code: ``path:line in function``."""
    frames = [(f, n, fn) for f, n, fn in re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
              if f.startswith(str(ROOT)) and "site-packages" not in f]
    return f"{Path(frames[-1][0]).relative_to(ROOT)}:{frames[-1][1]} in {frames[-1][2]}" if frames else "?"


def error_line(texts: list[str]) -> str:
    """The last line of the most telling rank's traceback (the first that is not a collective's timeout) and where in
    the zoo it was; when every rank timed out in a collective, where each rank was (they waited in different ones)."""
    failed = [(r, t, next((l.strip() for l in reversed(t.splitlines()) if l.strip()), "?")) for r, t in enumerate(texts) if t and t != "ok"]
    if not failed:
        return "?"
    own = [(r, t, line) for r, t, line in failed if not COLLECTIVE.search(line)]
    if own:
        return f"{own[0][2][:300]} (rank {own[0][0]}, {where(own[0][1])})"
    return f"{failed[0][2][:200]} (" + "; ".join(f"rank {r} in {where(t)}" for r, t, _ in failed) + ")"


def statuses(item: dict, devices: int) -> list[str]:
    """Each rank's status for a case: ``ok``, a traceback, or ``""`` (none yet)."""
    paths = [Path(item["dir"]) / f"status{r}.txt" for r in range(devices)]
    return [p.read_text() if p.exists() else "" for p in paths]


def started(item: dict, devices: int) -> float | None:
    """When the first rank started the case (None: not yet)."""
    times = [float(p.read_text() or 0) for p in (Path(item["dir"]) / f"started{r}" for r in range(devices)) if p.exists()]
    return min(times) if times else None


def wait_for(item: dict, procs: list[subprocess.Popen], devices: int, timeout: int) -> tuple[str, str] | None:
    """``("ok"|"FAILED", detail)`` of one case of a running group, or None when the group ended before it began."""
    failed_at, entered = None, time.time()
    while True:
        alive = any(p.poll() is None for p in procs)  # first: once all have exited, the files read next are final
        texts, began = statuses(item, devices), started(item, devices)
        if all(t == "ok" for t in texts):
            return "ok", ""
        if all(texts) or (began is not None and not alive):
            return "FAILED", error_line(texts) if any(texts) else "a rank died (see its log)"
        if began is None and not alive:
            return None
        if any(t and t != "ok" for t in texts):
            failed_at = failed_at or time.time()  # the other ranks may wait in a collective: give them a little while
            if time.time() - failed_at > 15:
                return "FAILED", error_line(texts)
        if began is not None and time.time() - began > timeout + 30:
            return "FAILED", f"no result after {timeout + 30} s (a hang?)"
        if began is None and time.time() - entered > timeout + 60:
            return "FAILED", f"not started after {timeout + 60} s"
        time.sleep(0.5)


def run_all(plan: list[dict], devices: int, timeout: int, out: Path, report) -> dict[str, tuple[str, str]]:
    """Every case of ``plan``; a failed or hung case ends its group of processes, and a new group goes on after it."""
    results, pending, k = {}, list(plan), 0
    while pending:
        procs, done = launch(pending, devices, out, k), 0
        for item in pending:
            res = wait_for(item, procs, devices, timeout)
            if res is None:
                break
            results[item["name"]] = res
            report(item, *res, time.time() - (started(item, devices) or time.time()))
            done += 1
            if res[0] != "ok":
                break
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if done == 0:  # the group could not start a case
            log = (out / f"group{k}_rank0.log").read_text().strip().splitlines()
            for item in pending:
                results[item["name"]] = ("FAILED", f"processes did not start: {log[-1] if log else '?'}"[:300])
                report(item, *results[item["name"]], 0.0)
            break
        pending, k = pending[done:], k + 1
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--devices", type=int, default=None, help="processes (default: all visible GPUs; 2 on CPU)")
    parser.add_argument("--techniques", default=",".join(TECHNIQUES), help=f"comma-separated, from {', '.join(TECHNIQUES)}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--precision", default=",".join(PRECISIONS))
    parser.add_argument("--timeout", type=int, default=120, help="seconds a case may take (also the process group's timeout)")
    parser.add_argument("--out", default=None, help="folder for the runs and logs (default: a new temporary folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False): nothing checked.")
        return 0
    devices = args.devices or (torch.cuda.device_count() if args.accelerator == "cuda" else 2)
    techniques, strategies, precisions = (a.split(",") for a in (args.techniques, args.strategies, args.precision))
    unknown = ([t for t in techniques if t not in TECHNIQUES] + [s for s in strategies if s not in STRATEGIES]
               + [p for p in precisions if p not in PRECISIONS])
    if unknown:
        parser.error(f"unknown {unknown}: techniques {list(TECHNIQUES)}, strategies {list(STRATEGIES)}, precisions {list(PRECISIONS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="zoo_gpu_check_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tests.standin import write_all

    standin = write_all(out / "standin")
    what = (f"{devices} x {torch.cuda.get_device_name(0)}" if args.accelerator == "cuda" else f"{devices} CPU processes (gloo)")
    print(f"gpu-check: {what}, torch {torch.__version__}; runs and logs in {out}", flush=True)
    skip_bf16 = args.accelerator == "cuda" and not torch.cuda.is_bf16_supported()
    plan = []
    for technique in techniques:
        for precision in precisions:
            if precision == "bf16-mixed" and skip_bf16:
                print(f"{'skipped':7} {technique:13} {'all':8} {precision:11} this GPU has no bfloat16")
                continue
            for strategy in strategies:
                name = f"{technique}-{strategy}-{precision}"
                plan.append({"name": name, "technique": technique, "strategy": strategy, "precision": precision, "dir": str(out / name),
                             "args": case_args(technique, strategy, precision, args.accelerator, devices, args.timeout, standin, out / name)})

    def report(item: dict, status: str, detail: str, seconds: float) -> None:
        print(f"{status:7} {item['technique']:13} {item['strategy']:8} {item['precision']:11} {seconds:6.1f} s  {detail}".rstrip(), flush=True)

    start = time.time()
    results = run_all(plan, devices, args.timeout, out, report)
    failed = sum(status != "ok" for status, _ in results.values())
    print(f"gpu-check: {len(results) - failed} ok, {failed} failed in {time.time() - start:.0f} s (logs: {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
