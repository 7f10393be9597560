"""``ModelSummary``: Lightning's summary table without its FLOPs column when nothing measured FLOPs.

Lightning 2.6 prints a "FLOPs" column of zeros and "Total FLOPs: 0" unless the module sets
``example_input_array``; the zoo's modules take inputs of many shapes, so the column only misleads.
The ``zoo`` command adds this callback in place of Lightning's default (``enable_model_summary: false``
turns it off as usual)::

    trainer:
      callbacks: [{class_path: callbacks.summary.ModelSummary, init_args: {max_depth: 2}}]
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")  # configured like Lightning's own summary


class ModelSummary(LightningModelSummary):
    """Lightning's ``ModelSummary`` with the FLOPs column and total shown only when they were measured."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:
        if total_flops:
            LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                            total_training_modes, total_flops, **summarize_kwargs)
            return
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [max(len(name), *(len(v) for v in values)) if values else len(name) for name, values in columns]
        rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
        rows.append("-" * len(rows[0]))
        for i in range(len(columns[0][1]) if columns else 0):
            rows.append(" | ".join(values[i].ljust(w) for (_, values), w in zip(columns, widths)))
        frozen = total_parameters - trainable_parameters
        rows.append("-" * len(rows[0]))
        rows.append(f"{get_human_readable_count(trainable_parameters)} trainable, {get_human_readable_count(frozen)} frozen, "
                    f"{get_human_readable_count(total_parameters)} total params ({model_size:.2f} MB); "
                    f"modules in train / eval mode: {total_training_modes['train']} / {total_training_modes['eval']}")
        log.info("\n" + "\n".join(rows))
