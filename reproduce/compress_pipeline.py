"""The compression pipeline on real data (issue 20): distill -> prune -> int8, accuracy / size on disk / CPU latency per stage.

Runs the three pipeline configs through the CLI, each after the teacher it needs, with command-line overrides that
shrink them to fit a shared 2-core CPU (fewer samples and epochs, a fixed slice of the validation split):

==========  ======================================  ==================================================================
part        teacher (step 1)                        student pipeline (step 2)
==========  ======================================  ==================================================================
``vit``     ``configs/distill/vit_teacher.yaml``    ``configs/compose/compress_vit.yaml`` (ViT 3x48 on Fashion-MNIST)
``lite0``   ``configs/distill/efficientnet_         ``configs/compose/compress_lite0.yaml`` (EfficientNet-Lite0, real
            teacher.yaml``                          ImageNet weights, Fashion-MNIST 32 px, int8_pt2e)
``minilm``  ``configs/distill/minilm_teacher.yaml`` ``configs/compose/compress_minilm.yaml`` (all-MiniLM-L6-v2, real
                                                    weights, Jane Austen: which novel a passage is from)
==========  ======================================  ==================================================================

The pruning schedule is rescaled to the shortened run (cubic, from 10 % to 70 % of the student's steps). Each student
run's ``callbacks.compression_report.CompressionReport`` writes ``<out>/<part>/lightning_logs/compress/
compression_report.md``; this script gathers the three tables into one Markdown table (``<out>/compress_pipeline.md``)
and one figure (``--figure``, default ``docs/figures/compress_pipeline.png``: accuracy vs size on disk and vs batch-1
CPU latency, one line per model through its stages). Accuracy is on the first ``--*-eval-batches`` batches of the
validation split (not shuffled). Latency as the configs set it: int8 not compiled (eager), unless ``--compile-int8``.
The report measures each stage when it happens (minutes apart: on a shared machine the load differs), so ``--collect``
also times the float and int8 checkpoints side by side, interleaved in one process (:func:`side_by_side`).

The README's table (each line a process; two ran at a time, ~20 min each on 2 shared cores):

    OMP_NUM_THREADS=1 nice -n 5 python reproduce/compress_pipeline.py --parts vit
    OMP_NUM_THREADS=1 nice -n 5 python reproduce/compress_pipeline.py --parts minilm
    OMP_NUM_THREADS=1 nice -n 5 python reproduce/compress_pipeline.py --parts lite0
    OMP_NUM_THREADS=1 nice -n 5 python reproduce/compress_pipeline.py --parts vit --compile-int8 --reuse-teacher
    OMP_NUM_THREADS=1 nice -n 5 python reproduce/compress_pipeline.py --parts minilm --compile-int8 --reuse-teacher
    OMP_NUM_THREADS=1 nice -n 5 python reproduce/compress_pipeline.py --collect     # table + side-by-side latency + figure
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = {  # part: (teacher config, its logger version, pipeline config, classes, model label)
    "vit": ("configs/distill/vit_teacher.yaml", "vit_teacher", "configs/compose/compress_vit.yaml", 10, "ViT 3x48 (Fashion-MNIST)"),
    "lite0": ("configs/distill/efficientnet_teacher.yaml", "efficientnet_teacher", "configs/compose/compress_lite0.yaml", 10,
              "EfficientNet-Lite0 (Fashion-MNIST 32 px)"),
    "minilm": ("configs/distill/minilm_teacher.yaml", "minilm_teacher", "configs/compose/compress_minilm.yaml", 6, "MiniLM-L6 (Jane Austen)"),
}


def data_overrides(part: str, args) -> list[str]:
    spc, bs = getattr(args, f"{part}_samples_per_class"), getattr(args, f"{part}_batch_size")
    out = [f"--data.init_args.samples_per_class={spc}", f"--data.init_args.batch_size={bs}"]
    if part == "minilm":
        out.append(f"--data.init_args.max_length={args.minilm_max_length}")
    return out


def common(part: str, args, epochs: int, config_path: str) -> list[str]:
    """Overrides shared by the teacher and the student: data size, epochs, validation slice, a quiet log."""
    out = [f"--trainer.max_epochs={epochs}", f"--trainer.limit_val_batches={getattr(args, f'{part}_eval_batches')}",
           "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=10", *data_overrides(part, args)]
    config = yaml.safe_load((ROOT / config_path).read_text())
    if config["model"]["init_args"].get("lr_scheduler"):  # CosineAnnealingLR over the (shortened) epochs
        out.append(f"--model.init_args.lr_scheduler.init_args.T_max={epochs}")
    return out


def steps_per_epoch(part: str, args) -> int:
    return math.ceil(getattr(args, f"{part}_samples_per_class") * PARTS[part][3] / getattr(args, f"{part}_batch_size"))


def teacher_command(part: str, args) -> list[str]:
    teacher, version = PARTS[part][0], PARTS[part][1]
    epochs = getattr(args, f"{part}_teacher_epochs")
    return [sys.executable, "cli.py", "fit", "--config", teacher, f"--trainer.logger.init_args.save_dir={args.out}/{part}",
            f"--trainer.logger.init_args.version={version}", *common(part, args, epochs, teacher)]


def student_command(part: str, args, version: str) -> list[str]:
    _, teacher_version, pipeline, _, _ = PARTS[part]
    config = yaml.safe_load((ROOT / pipeline).read_text())
    epochs = getattr(args, f"{part}_epochs")
    steps = epochs * steps_per_epoch(part, args)
    best = f"{args.out}/{part}/lightning_logs/{teacher_version}/checkpoints/best.ckpt"
    losses = config["model"]["init_args"]["losses"]
    for term in losses:
        if "teacher" in term.get("init_args", {}):
            term["init_args"]["teacher"] = best
    schedule = config["callbacks"]["pruning"]["init_args"]["schedule"]["init_args"]
    start, end = max(1, steps // 10), max(2, 7 * steps // 10)
    frequency = max(1, min(schedule["frequency"], (end - start) // 10))
    cmd = [sys.executable, "cli.py", "fit", "--config", pipeline,
           f"--trainer.logger.init_args.save_dir={args.out}/{part}", f"--trainer.logger.init_args.version={version}",
           *common(part, args, epochs, pipeline), f"--model.init_args.losses={json.dumps(losses)}",
           f"--callbacks.pruning.init_args.schedule.init_args.start={start}",
           f"--callbacks.pruning.init_args.schedule.init_args.end={end}",
           f"--callbacks.pruning.init_args.schedule.init_args.frequency={frequency}",
           f"--callbacks.report.init_args.eval_batches={getattr(args, f'{part}_eval_batches')}",
           f"--callbacks.report.init_args.latency_repeats={args.latency_repeats}"]
    if args.compile_int8:
        cmd.append("--callbacks.quantize.init_args.compile=true")
    return cmd


def execute(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in the repository root (output to ``log``); wall seconds and the 1-minute load before/after."""
    shown = " ".join(c if c.startswith("--") and "'" not in c and " " not in c else repr(c) if " " in c else c for c in cmd[1:])
    print(f"$ {shown}", flush=True)
    load0, t0 = os.getloadavg()[0], time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode
    info = {"command": shown, "rc": rc, "wall_s": round(time.time() - t0, 1), "load_before": load0, "load_after": os.getloadavg()[0]}
    print(f"  -> rc {rc}, {info['wall_s']} s (load {load0:.1f} -> {info['load_after']:.1f}); log {log}", flush=True)
    if rc:
        raise SystemExit(f"failed: see {log}")
    return info


def run_part(part: str, args) -> None:
    folder = Path(args.out) / part
    folder.mkdir(parents=True, exist_ok=True)
    version = "compress_compiled" if args.compile_int8 else "compress"
    info = {"part": part, "samples_per_class": getattr(args, f"{part}_samples_per_class"),
            "batch_size": getattr(args, f"{part}_batch_size"), "steps_per_epoch": steps_per_epoch(part, args),
            "teacher_epochs": getattr(args, f"{part}_teacher_epochs"), "epochs": getattr(args, f"{part}_epochs"),
            "eval_batches": getattr(args, f"{part}_eval_batches"), "compiled": args.compile_int8}
    best = folder / "lightning_logs" / PARTS[part][1] / "checkpoints" / "best.ckpt"
    if best.is_file() and args.reuse_teacher:
        print(f"{part}: reusing the teacher {best}", flush=True)
    else:
        info["teacher"] = execute(teacher_command(part, args), folder / "teacher.log")
    info["student"] = execute(student_command(part, args, version), folder / f"{version}.log")
    (folder / f"{version}.json").write_text(json.dumps(info, indent=1))


def teacher_accuracy(part: str, args) -> float | None:
    """The teacher's best val/acc (its checkpoint callback's ``best_model_score``)."""
    import torch

    best = Path(args.out) / part / "lightning_logs" / PARTS[part][1] / "checkpoints" / "best.ckpt"
    if not best.is_file():
        return None
    states = torch.load(best, map_location="cpu", weights_only=False).get("callbacks", {})
    scores = [v["best_model_score"] for v in states.values() if v.get("best_model_score") is not None]
    return float(scores[0]) if scores else None


def read_report(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def collect(args) -> None:
    """One Markdown table and one figure from every ``<out>/<part>/lightning_logs/compress*/compression_report.md``."""
    runs = []
    for part in PARTS:
        for version in ("compress", "compress_compiled"):
            report = Path(args.out) / part / "lightning_logs" / version / "compression_report.md"
            meta = Path(args.out) / part / f"{version}.json"
            if report.is_file() and meta.is_file():
                runs.append((part, version, read_report(report), json.loads(meta.read_text())))
    if not runs:
        raise SystemExit(f"no compression_report.md under {args.out}")
    lines = ["| model | stage | precision | int8 compiled | val acc | state_dict MB | gzip MB | zero weights | CPU ms, batch 1 | CPU ms, batch N |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for part, version, rows, meta in runs:
        compiled = "yes" if meta["compiled"] else "no"
        for r in rows:
            lines.append(f"| {PARTS[part][4]} | {r['stage']} | {r['precision']} | {r.get('compiled', compiled) if r['stage'] == 'int8' else '-'} | {r['accuracy']} | "
                         f"{r['bytes'].replace(' MB', '')} | {r['gzip_bytes'].replace(' MB', '')} | {r['sparsity']} | {r['latency_ms_b1']} | {r['latency_ms_batch']} |")
        student, teacher = meta["student"], meta.get("teacher")
        notes.append(f"- {PARTS[part][4]}{' (int8 compiled)' if meta['compiled'] else ''}: {meta['samples_per_class']} training samples/class, batch "
                     f"{meta['batch_size']} (N), {meta['steps_per_epoch']} steps/epoch; teacher {meta['teacher_epochs']} epoch(s) "
                     f"(val acc {teacher_accuracy(part, args):.4f} on the same slice), student "
                     f"{meta['epochs']} epoch(s) ({meta['epochs'] * meta['steps_per_epoch']} steps); accuracy on the first "
                     f"{meta['eval_batches'] * meta['batch_size']} validation samples; wall: teacher "
                     f"{str(teacher['wall_s']) + ' s' if teacher else 'reused from the run above'}, pipeline {student['wall_s']} s; "
                     f"1-min load {student['load_before']:.1f} -> {student['load_after']:.1f}")
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    ratios = []
    if args.latency_rounds:
        table, ratios = side_by_side(args, runs)
        text += (f"\nSide by side (float32 after distill+prune vs int8, reloaded from the checkpoints, interleaved, median and min of "
                 f"{args.latency_rounds} rounds, 1-min load {os.getloadavg()[0]:.1f}; float32 compiled where int8 is):\n\n" + table + "\n")
    (Path(args.out) / "compress_pipeline.md").write_text(text)
    print(text)
    figure(runs, Path(args.figure), ratios)


def example_inputs(part: str, batch: int, max_length: int):
    """Inputs of the part's shape (latency only: random pixels / token ids, every token attended)."""
    import torch

    if part == "minilm":
        ids = torch.randint(1000, 20000, (batch, max_length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    size = 32 if part == "lite0" else 28
    return torch.randn(batch, 1, size, size)


def side_by_side(args, runs) -> str:
    """CPU latency of each run's float model (after distill+prune: ``last.ckpt``) and int8 model (``quantized.ckpt``),
    both reloaded with ``zoo.load_zoo_module`` (and both compiled for a ``--compile-int8`` run) and timed in one process, interleaved (one forward of each per round,
    median and min over ``--latency-rounds``; min: the least disturbed forward): on a shared machine the load hits both alike, so the ratio is fair even where
    the per-stage columns above (measured minutes apart) are not."""
    import statistics

    import torch

    from zoo import load_zoo_module
    from zoo.quantize import compile_quantized

    ratios = []  # (label, batch, int8/float32 median)
    lines = ["| model | int8 compiled | batch | float32 ms (median / min) | int8 ms (median / min) | int8 / float32 (median / min) |",
             "|---|---|---|---|---|---|"]
    for part, version, rows, meta in runs:
        folder = Path(args.out) / part / "lightning_logs" / version / "checkpoints"
        models = {"float32": load_zoo_module(folder / "last.ckpt").eval(), "int8": load_zoo_module(folder / "quantized.ckpt").eval()}
        if meta["compiled"]:  # compiled int8 against float compiled alike (the int8 checkpoint recompiles itself: Quantize(compile=True))
            compile_quantized(models["float32"].backbone)
        for batch in (1, meta["batch_size"]):
            x = example_inputs(part, batch, args.minilm_max_length)
            times = {k: [] for k in models}
            with torch.no_grad():
                for _ in range(3):  # warm-up (and compilation, where compiled)
                    for m in models.values():
                        m(x)
                for _ in range(args.latency_rounds):
                    for k, m in models.items():
                        t0 = time.perf_counter()
                        m(x)
                        times[k].append(time.perf_counter() - t0)
            f, q = (1000 * statistics.median(times[k]) for k in ("float32", "int8"))
            f0, q0 = (1000 * min(times[k]) for k in ("float32", "int8"))
            lines.append(f"| {PARTS[part][4]} | {'yes' if meta['compiled'] else 'no'} | {batch} | {f:.2f} / {f0:.2f} | {q:.2f} / {q0:.2f} | "
                         f"{q / f:.2f} / {q0 / f0:.2f} |")
            ratios.append((PARTS[part][4].split(" (")[0] + (" compiled" if meta["compiled"] else ""), batch, q / f))
            print(lines[-1], flush=True)
    return "\n".join(lines), ratios


def figure(runs, path: Path, ratios=()) -> None:
    """Accuracy vs size (raw, gzip) and vs batch-1 latency through the stages; with ``ratios``, a fourth panel: the
    side-by-side int8 / float32 latency ratio per model and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if ratios else 3, figsize=(20 if ratios else 15, 4.2))
    for part, version, rows, meta in runs:
        label = PARTS[part][4] + (" [int8 compiled]" if meta["compiled"] else "")
        acc = [float(r["accuracy"]) for r in rows]
        mb = [float(r["bytes"].split()[0]) for r in rows]
        gz = [float(r["gzip_bytes"].split()[0]) if r["gzip_bytes"] != "-" else math.nan for r in rows]
        ms = [float(r["latency_ms_b1"]) for r in rows]
        style = "--" if meta["compiled"] else "-"
        for ax, x in zip(axes[:3], (mb, gz, ms)):
            line, = ax.plot(x, acc, style, marker="o", label=label)
            for xi, yi, r in zip(x, acc, rows):
                ax.annotate(r["stage"].replace("distill_prune", "distill+prune"), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points",
                            color=line.get_color())
    for ax, title in zip(axes[:3], ("state_dict size on disk (MB)", "gzip size on disk (MB)", "CPU latency, batch 1 (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("val top-1")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if ratios:
        labels = [f"{label}, b{batch}" for label, batch, _ in ratios]
        axes[3].barh(range(len(ratios)), [r for _, _, r in ratios], color=["tab:orange" if "compiled" in l else "tab:gray" for l in labels])
        axes[3].set_yticks(range(len(ratios)), labels, fontsize=7)
        axes[3].axvline(1.0, color="k", lw=0.8)
        axes[3].set_xlabel("int8 / float32 CPU latency (side by side, median)")
        axes[3].invert_yaxis()
    fig.suptitle("distill -> prune -> int8: start / after distill+prune / after int8 (real data, shortened runs, shared CPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="*", choices=list(PARTS), default=[])
    p.add_argument("--out", default="/tmp/compress_runs")
    p.add_argument("--figure", default=str(ROOT / "docs/figures/compress_pipeline.png"))
    p.add_argument("--collect", action="store_true", help="after the parts (or alone): the table and the figure from <out>")
    p.add_argument("--compile-int8", action="store_true", help="the int8 stage compiled (callbacks.quantize compile: true)")
    p.add_argument("--reuse-teacher", action="store_true", help="skip a part's teacher when its best.ckpt exists")
    p.add_argument("--latency-repeats", type=int, default=20, help="the report's timed forwards per stage (median)")
    p.add_argument("--latency-rounds", type=int, default=30, help="--collect: interleaved float/int8 rounds (0: skip)")
    p.add_argument("--vit-samples-per-class", type=int, default=500)
    p.add_argument("--vit-batch-size", type=int, default=128)
    p.add_argument("--vit-teacher-epochs", type=int, default=6)
    p.add_argument("--vit-epochs", type=int, default=6)
    p.add_argument("--vit-eval-batches", type=int, default=16)
    p.add_argument("--lite0-samples-per-class", type=int, default=300)
    p.add_argument("--lite0-batch-size", type=int, default=64)
    p.add_argument("--lite0-teacher-epochs", type=int, default=2)
    p.add_argument("--lite0-epochs", type=int, default=3)
    p.add_argument("--lite0-eval-batches", type=int, default=8)
    p.add_argument("--minilm-samples-per-class", type=int, default=200)
    p.add_argument("--minilm-batch-size", type=int, default=16)
    p.add_argument("--minilm-max-length", type=int, default=64)
    p.add_argument("--minilm-teacher-epochs", type=int, default=1)
    p.add_argument("--minilm-epochs", type=int, default=1)
    p.add_argument("--minilm-eval-batches", type=int, default=16)
    args = p.parse_args(argv)
    if not args.parts and not args.collect:
        p.error("nothing to do: give --parts and/or --collect")
    for part in args.parts:
        run_part(part, args)
    if args.collect:
        collect(args)


if __name__ == "__main__":
    main()
