"""Pruning as model surgery (the schedules and masks of pruning *during* training are callbacks: ``callbacks.pruning``).

==============  ===========================================================================================
``structured``  the Torch-Pruning code shared with ``callbacks.pruning.StructuredPruning``: groups of coupled
                layers (Fang et al. 2023, "DepGraph"), L2-norm ranking, heads, EMoE expert neurons, removal
``surgery``     :class:`PruneStructured`: one-shot structured pruning of a backbone at build time, then finetune
                (Li et al. 2017, "Pruning Filters for Efficient ConvNets")
==============  ===========================================================================================

    from zoo import Classifier
    from zoo.pruning import PruneStructured

    model = Classifier("timm/vit_tiny_patch16_224", pretrained=True, surgery=[PruneStructured(sparsity=0.5)])
"""

from zoo.pruning.structured import expert_keep, expert_layers, names_check, opaque_experts, remove_channels
from zoo.pruning.surgery import PruneStructured, infer_input_shape

__all__ = ["PruneStructured", "expert_keep", "expert_layers", "infer_input_shape", "names_check", "opaque_experts", "remove_channels"]
