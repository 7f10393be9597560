"""ExpertLoad: how evenly do the tokens spread over the experts of each EMoE layer?

Logs, for every :class:`zoo.emoe.EMoEFFN` of the model, the share of training routing assignments
each expert received (summed over all DDP ranks; uniform routing gives ``1 / num_experts``), and at
each training epoch end draws a layers x experts heatmap in TensorBoard.

    trainer:
      callbacks:
        - class_path: callbacks.expert_load.ExpertLoad
          init_args: {log_every_n_steps: 50}
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from zoo.emoe import emoe_layers


class ExpertLoad(Callback):
    """Per-layer expert load (fraction of routed tokens per expert) as scalars and a TensorBoard heatmap.

    Args:
        log_every_n_steps: log ``expert_load/<layer>/max`` and ``/min`` (max and min share x ``num_experts``,
            1.0 = perfectly balanced) every that many optimizer steps, over the tokens since the last log.
        heatmap: add the figure ``expert_load/heatmap`` (loads of the whole epoch) at each epoch end.
    """

    def __init__(self, log_every_n_steps: int = 50, heatmap: bool = True):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps}: expected >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.heatmap = heatmap
        self.window: dict[str, torch.Tensor] = {}
        self.epoch: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after configure_model (where a module's surgery makes the EMoE layers), before the first step
        if not emoe_layers(pl_module):
            raise ValueError(f"ExpertLoad: {type(pl_module).__name__} has no EMoE layer (add zoo.emoe.Moefy to its surgery, or use zoo.emoe.EMoEModule)")

    def _collect(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """Tokens per expert since the last call, summed over ranks; resets the layers' counters."""
        out = {}
        for name, layer in emoe_layers(pl_module):
            counts = layer.routing_counts
            counts = torch.zeros(layer.num_experts, dtype=torch.long, device=pl_module.device) if counts is None else counts.to(pl_module.device)
            out[name] = trainer.strategy.reduce(counts.double(), reduce_op="sum").cpu()
            layer.routing_counts = None
        return out

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collect(trainer, pl_module)  # drop counts from outside this epoch's training steps
        self.window, self.epoch = {}, {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        for name, counts in self._collect(trainer, pl_module).items():
            self.window[name] = self.window.get(name, 0) + counts
            self.epoch[name] = self.epoch.get(name, 0) + counts
        if trainer.global_step % self.log_every_n_steps == 0 and self.window:
            metrics = {}
            for name, counts in self.window.items():
                share = counts / counts.sum().clamp_min(1) * len(counts)
                metrics[f"expert_load/{name}/max"] = share.max().item()
                metrics[f"expert_load/{name}/min"] = share.min().item()
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
            self.window = {}

    def loads(self) -> dict[str, torch.Tensor]:
        """This epoch's share of routed tokens per expert, per layer (each row sums to 1)."""
        return {name: counts / counts.sum().clamp_min(1) for name, counts in self.epoch.items()}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loads = self.loads()
        if not (self.heatmap and loads and trainer.is_global_zero):
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_figure"):
            return
        experiment.add_figure("expert_load/heatmap", heatmap_figure(loads), global_step=trainer.global_step)


def heatmap_figure(loads: dict[str, torch.Tensor]):
    """A matplotlib figure: one row per layer, one column per expert, colour = share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(v) for v in loads.values())
    grid = torch.full((len(loads), width), float("nan"))
    for i, v in enumerate(loads.values()):
        grid[i, : len(v)] = v.float()
    fig, ax = plt.subplots(figsize=(min(2 + width * 0.25, 16), 1 + 0.5 * len(loads)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(loads)), list(loads))
    ax.set_xlabel("expert")
    ax.set_title("share of routed tokens per expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
