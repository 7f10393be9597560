"""Parameter-efficient finetuning as model surgery (issue 19): adapters with a way back to a plain model.

=================  ===========================================================================================
``targets``        :func:`select`: which layers (name pattern, or parts of blocks from :mod:`zoo.families`)
=================  ===========================================================================================
"""

from zoo.adapters.targets import PARTS, adaptable, adaptable_layers, block_names, layer_dims, select

__all__ = ["PARTS", "adaptable", "adaptable_layers", "block_names", "layer_dims", "select"]
