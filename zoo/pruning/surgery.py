"""``PruneStructured``: one-shot structured pruning as a model surgery, for the "prune, then finetune" recipe
(Li et al. 2017, "Pruning Filters for Efficient ConvNets"; groups of coupled layers by Torch-Pruning's DepGraph,
Fang et al. 2023)::

    model:
      class_path: zoo.Classifier
      init_args:
        model: runs/lightning_logs/vit_teacher/checkpoints/best.ckpt    # a trained model
        surgery:
          - class_path: zoo.pruning.PruneStructured
            init_args: {sparsity: 0.5}

The backbone is pruned in ``configure_model`` (before training, and again before a checkpoint is loaded: the number
of channels removed from each group does not depend on the weights, so the structure is rebuilt identically) and
the smaller model is then finetuned. It uses the same code as the :class:`callbacks.pruning.StructuredPruning`
callback (:mod:`zoo.pruning.structured`), so both remove the same channels from the same weights.
"""

from __future__ import annotations

import warnings
import torch
from torch import nn

from zoo.pruning.structured import names_check, remove_channels
from zoo.surgery import Surgery


def infer_input_shape(model: nn.Module) -> list[int]:
    """The shape of one input (no batch dimension) that ``model`` takes: a timm ViT's ``patch_embed`` size, else the
    first conv's channels at the model's ``pretrained_cfg`` size (32 x 32 without one), else the first linear's width."""
    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise ValueError(f"PruneStructured: {type(model).__name__} embeds tokens; it traces models fed one float tensor "
                         "(prune token models with callbacks.pruning.StructuredPruning, which traces a real batch)")
    pe = getattr(model, "patch_embed", None)
    if isinstance(getattr(pe, "proj", None), nn.Conv2d) and getattr(pe, "img_size", None):
        return [pe.proj.in_channels, *pe.img_size]
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0, 32, 32))
        return [first.in_channels, *size[1:]]
    if isinstance(first, nn.Linear):
        return [first.in_features]
    raise ValueError(f"PruneStructured: cannot tell the input shape of {type(model).__name__}; set input_shape (e.g. [3, 224, 224])")


class PruneStructured(Surgery):
    """Remove the lowest-L2-norm channels, attention heads and FFN neurons of the backbone in one shot (physically:
    the model gets smaller and faster). EMoE layers lose the lowest-norm neurons of every expert.

    Every group of coupled layers keeps ``int((1 - sparsity) * channels)`` channels (timm attention: of its heads;
    with ``round_to``, a multiple of it); every EMoE expert loses ``round(sparsity * neurons)``. The counts do not
    depend on the weights. The backbone's output width, which the head reads, is kept, and so are the output
    channels of frozen modules and of those matching ``ignore``.

    ``undo`` returns the model as it is: the pruned model is already a plain model and the removed weights are gone
    (not recoverable, unlike PEFT's ``merge_and_unload`` which folds adapters in).

    Args:
        sparsity: fraction of each group's channels (heads, neurons) removed, in [0, 1).
        ignore: fnmatch patterns of module names (relative to the backbone, e.g. ``blocks.0.*``) whose output
            channels are kept; each must match a module.
        round_to: keep channel counts multiples of this (hardware-friendly).
        prune_heads: remove whole heads of timm-style attention (else the head dimension shrinks).
        input_shape: one input's shape (no batch dimension) to trace the model with; None infers it
            (:func:`infer_input_shape`).
    """

    def __init__(self, sparsity: float, ignore: list[str] | None = None, round_to: int | None = None, prune_heads: bool = True,
                 input_shape: list[int] | None = None):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"PruneStructured: sparsity={sparsity!r} is outside [0, 1)")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"PruneStructured: round_to={round_to!r}: expected a positive integer or null")
        if input_shape is not None and (not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
            raise ValueError(f"PruneStructured: input_shape={input_shape!r}: expected positive integers, e.g. [3, 224, 224]")
        if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore or []):
            raise ValueError(f"PruneStructured: ignore={ignore!r}: expected a list of module-name patterns")
        self.sparsity = float(sparsity)
        self.ignore = list(ignore or [])
        self.round_to = round_to
        self.prune_heads = bool(prune_heads)
        self.input_shape = None if input_shape is None else list(input_shape)

    def example(self, model: nn.Module) -> torch.Tensor:
        """One input to trace ``model`` with (``input_shape``, or inferred), on the model's device and dtype."""
        p = next(model.parameters())
        shape = self.input_shape or infer_input_shape(model)
        return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)

    def transform(self, model: nn.Module) -> nn.Module:
        names_check(model, self.ignore, "PruneStructured: ignore pattern")
        if self.sparsity == 0:
            return model
        before = sum(p.numel() for p in model.parameters())
        remove_channels(model, self.sparsity, self.example(model), ignore=self.ignore, keep_output=True,
                        prune_heads=self.prune_heads, round_to=self.round_to)
        if sum(p.numel() for p in model.parameters()) == before:
            warnings.warn(f"{self!r} removed nothing from {type(model).__name__}: every group of coupled layers is ignored, "
                          "frozen or reaches the output, or rounds to zero channels", stacklevel=2)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        """The model as it is: a pruned model is a plain model, and the removed channels cannot be restored."""
        return model
