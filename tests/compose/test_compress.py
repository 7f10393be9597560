"""The compression pipeline (configs/compose/compress_vit.yaml): distill -> prune -> quantise in one fit, and the
CompressionReport has one row per stage with the right fields, the pruned zeros and int8 weights shrinking the
model on disk, written as a table and a TensorBoard figure; the report listed before a compressor fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks.compression_report import FIELDS, CompressionReport
from tests.helpers import ROOT
from tests.standin import fit_config
from zoo.distillation import SoftTargetKL
from zoo.quantize import Quantize

CONFIG = ROOT / "configs" / "compose" / "compress_vit.yaml"
SCHEDULE = "--callbacks.pruning.init_args.schedule.init_args"


def run_config(tmp_path: Path, monkeypatch, *extra: str):
    """3 steps, pruned to the config's 50 % at steps 0..2, report on 1 validation batch, a TensorBoard logger."""
    return fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.init_args.batch_size=16",
                      f"{SCHEDULE}.start=0", f"{SCHEDULE}.end=2", f"{SCHEDULE}.frequency=1",
                      "--callbacks.report.init_args.eval_batches=1", "--callbacks.report.init_args.latency_repeats=2",
                      "--callbacks.quantize.init_args.calibration_batches=1",
                      "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path / 'tb'}", *extra)


def test_report_has_one_row_per_stage_and_sizes_shrink(tmp_path, monkeypatch):
    run = run_config(tmp_path, monkeypatch)
    module, trainer = run.model, run.trainer
    (report,) = [c for c in trainer.callbacks if isinstance(c, CompressionReport)]
    assert [r["stage"] for r in report.rows] == ["start", "distill_prune", "int8"]
    assert all(tuple(r) == FIELDS for r in report.rows)
    start, pruned, int8 = report.rows
    assert [r["precision"] for r in report.rows] == ["float32", "float32", "int8_dynamic"]
    assert [r["compiled"] for r in report.rows] == [False, False, False]  # the config's default: eager int8
    # the pipeline really happened: distillation term trained, half the blocks' weights zero, Linears int8
    assert module.loss_term(SoftTargetKL).weight == 0.9 and "train/soft_target_kl" in trainer.logged_metrics
    assert isinstance(module.surgery[-1], Quantize)
    blocks = sum(p.numel() for n, p in module.backbone.named_parameters() if n.startswith("blocks.") and p.ndim >= 2)
    total = sum(p.numel() for p in module.backbone.parameters() if p.ndim >= 2)
    assert start["sparsity"] == 0 and pruned["sparsity"] == pytest.approx(0.5 * blocks / total, abs=0.01)
    # sizes: dense storage keeps the pruned size until int8; gzip sees the zeros
    assert pruned["bytes"] == pytest.approx(start["bytes"], rel=0.01) and int8["bytes"] < 0.5 * pruned["bytes"]
    assert start["gzip_bytes"] > pruned["gzip_bytes"] > int8["gzip_bytes"]
    assert all(0 <= r["accuracy"] <= 1 and r["latency_ms_b1"] > 0 and r["latency_ms_batch"] > 0 for r in report.rows)
    # the int8 row's accuracy is the int8 model's: recomputed here on the same validation batch
    batch = next(iter(trainer.datamodule.val_dataloader()))
    with torch.no_grad():
        acc = float((module.eval().batch_logits(batch).argmax(-1) == batch.targets).float().mean())
    assert int8["accuracy"] == pytest.approx(acc)
    # the table in the logs and the figure in TensorBoard
    log_dir = Path(trainer.logger.log_dir)
    table = (log_dir / "compression_report.md").read_text().strip().splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| start | float32 |") and table[4].startswith("| int8 | int8_dynamic | no |")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "compression/report" in events.Tags()["images"]
    assert len(events.Scalars("compression/gzip_bytes")) == 3


def test_report_before_a_compressor_fails_and_bad_arguments_name_themselves():
    from lightning.pytorch import Trainer

    from callbacks.pruning import MagnitudePruning
    from callbacks.pruning_schedules import Cubic
    from callbacks.quantize import PostTrainingQuantization

    for late in (PostTrainingQuantization(), MagnitudePruning(Cubic(final_sparsity=0.5, start=0, end=2))):
        report = CompressionReport()
        trainer = Trainer(callbacks=[report, late], logger=False, enable_checkpointing=False, enable_progress_bar=False)
        with pytest.raises(ValueError, match=f"{type(late).__name__} comes after CompressionReport"):
            report.setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="eval_batches=0"):
        CompressionReport(eval_batches=0)
    with pytest.raises(ValueError, match="latency_repeats=0"):
        CompressionReport(latency_repeats=0)
