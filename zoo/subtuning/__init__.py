"""SubTuning: finetune a chosen subset of a pretrained network's layers, freeze the rest.

Kaplun et al., "Less is More: Selective Layer Finetuning with SubTuning", 2023
(https://arxiv.org/abs/2302.06354). The layers to train come from the *finetuning profile* and a greedy
search (:mod:`zoo.subtuning.profile`). Because the network before the first finetuned layer is frozen, it
runs without autograd, its outputs can be cached across epochs, and several tasks can share it at
inference (:class:`MultiTaskSubTuned`).

==============  ===========================================================================================
``layers``      :class:`Freeze` (the surgery), :func:`candidate_layers`, :func:`resolve_layers`
``chain``       :class:`LayerChain`: a backbone run from any block (prefix -> blocks -> tail)
``cache``       :class:`FeatureCache`: per-sample prefix outputs keyed by the batch's ``index``
``prefix``      :class:`FrozenPrefix`: what a module does with a ``Freeze`` (no-grad prefix, eval mode, cache)
``module``      :class:`SubTuningModule`: a :class:`zoo.Classifier` preset with ``surgery: [Freeze]``
``multitask``   :class:`MultiTaskSubTuned`: several SubTuned models sharing one frozen trunk
``profile``     :class:`ProfileRunner`, :func:`greedy_select` (the callback: ``callbacks.subtuning_profile``)
``recipe``      :class:`ScoringRecipe`: how each candidate is trained and scored (``official``, ``fast``)
==============  ===========================================================================================

YAML: ``zoo.subtuning.SubTuningModule`` (see its docstring), or the surgery on any zoo module::

    surgery:
      - class_path: zoo.subtuning.Freeze
        init_args: {trainable_layers: [blocks.5, blocks.6], granularity: stage, cache_frozen_features: true}
"""

from zoo.subtuning.cache import FeatureCache, index_space
from zoo.subtuning.chain import LayerChain
from zoo.subtuning.layers import GRANULARITIES, Freeze, candidate_layers, covered, freeze_except, frozen_eval, resolve_layers
from zoo.subtuning.module import SubTuningModule
from zoo.subtuning.multitask import MultiTaskSubTuned
from zoo.subtuning.prefix import FrozenPrefix
from zoo.subtuning.profile import FULL, ProfileRunner, greedy_select, profile_figure, stack_dataset, write_outputs
from zoo.subtuning.recipe import ScoringRecipe, fold_indices

__all__ = [
    "FULL", "GRANULARITIES", "FeatureCache", "Freeze", "FrozenPrefix", "LayerChain", "MultiTaskSubTuned", "ProfileRunner", "ScoringRecipe",
    "SubTuningModule", "candidate_layers", "covered", "fold_indices", "freeze_except", "frozen_eval", "greedy_select", "index_space", "profile_figure", "resolve_layers",
    "stack_dataset", "write_outputs",
]
