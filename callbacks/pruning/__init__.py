"""Pruning callbacks that work on every zoo module.

* :class:`MagnitudePruning`: unstructured magnitude pruning (per layer by default, or global) following a
  schedule (Zhu & Gupta 2017, "To prune, or not to prune"), on every weight tensor by default (EMoE
  experts included) or on parameters chosen by name pattern.
* :class:`StructuredPruning`: channels, attention heads, FFN and EMoE-expert neurons by L2 norm (Torch-Pruning,
  Fang et al. 2023, "DepGraph"), masked during training and physically removed at the end of fit. Its grouping and
  removal live in :mod:`zoo.pruning.structured`, shared with the one-shot surgery :class:`zoo.pruning.PruneStructured`
  (prune at build time, then finetune).
* :class:`LotteryTicket`: iterative magnitude pruning with weight rewinding to step ``k``
  (Frankle & Carbin 2019; Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis").

Each logs, when training starts, a table of the tensors it prunes by module type, and warns when its selection
leaves every attention or every FFN module of a known model family (:mod:`zoo.families`) unpruned.

==============  ===========================================================================================
``base``        :class:`MaskedPruning`: schedule, ``torch.nn.utils.prune`` masks, checkpoints, DDP, figures
``selection``   which tensors are weights, :func:`select_parameters`, the by-type / by-role report
``magnitude``   :class:`MagnitudePruning`, :class:`LotteryTicket`
``structured``  :class:`StructuredPruning`
==============  ===========================================================================================
"""

from callbacks.pruning.base import MaskedPruning
from callbacks.pruning.magnitude import LotteryTicket, MagnitudePruning
from callbacks.pruning.selection import by_module_type, default_weights, select_parameters, untouched_roles, weight_tensors
from callbacks.pruning.structured import StructuredPruning

_MaskedPruning = MaskedPruning  # the name before the package split

__all__ = ["LotteryTicket", "MagnitudePruning", "MaskedPruning", "StructuredPruning", "by_module_type", "default_weights",
           "select_parameters", "untouched_roles", "weight_tensors"]
