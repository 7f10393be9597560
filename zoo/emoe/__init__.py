"""EMoE: emergent mixture-of-experts carved out of the dense FFNs of a pretrained model.

Qiu et al., "Emergent Mixture-of-Experts: Can Dense Pre-trained Transformers Benefit from Emergent
Modular Structures?" (paper code: qiuzh20/EMoE). The parts:

==================  ====================================================================================
``layers``          :class:`EMoEFFN` (stacked experts, mean-key gates, sparse dispatch), :func:`balanced_clusters`
``routing``         tutel's routing as the official code: :class:`CosineRouter`, capacity and token dropping, aux losses
``defaults``        the official settings per family (experts, top-k, layers scaled by depth, expert dropout, aux weight)
``convert``         :func:`moefy` / :func:`demoefy` (a model's dense FFNs to EMoE layers and back), :func:`find_ffns`
``surgery``         :class:`Moefy`: the same as a :class:`zoo.surgery.Surgery` (``undo`` = ``demoefy``)
``losses``          :class:`BalanceLoss`: the GShard load-balance term (:class:`zoo.losses.LossTerm`)
``module``          :class:`EMoEModule`: a :class:`zoo.Classifier` preset with ``[Moefy]`` and ``[CrossEntropy, BalanceLoss]``
==================  ====================================================================================

    model = build_backbone("pypi/all-MiniLM-L6-v2", pretrained=True)
    emoe = moefy(model, num_experts=64, top_k=16, layers=[4])       # a converted copy
    dense = demoefy(emoe)                                            # back to BertIntermediate/Linear
"""

from zoo.emoe.convert import FAMILIES, SUPPORTED, demoefy, emoe_layers, ffn_family, find_ffns, moefy, paper_defaults, select_layers, to_dense
from zoo.emoe.layers import DISPATCH, GATES, EMoEFFN, balanced_clusters
from zoo.emoe.losses import BalanceLoss
from zoo.emoe.module import EMoEModule
from zoo.emoe.routing import AUX_LOSSES, ROUTERS, CosineRouter
from zoo.emoe.surgery import Moefy

__all__ = [
    "AUX_LOSSES", "DISPATCH", "FAMILIES", "GATES", "ROUTERS", "SUPPORTED", "BalanceLoss", "CosineRouter", "EMoEFFN", "EMoEModule", "Moefy", "balanced_clusters", "demoefy",
    "emoe_layers", "ffn_family", "find_ffns", "moefy", "paper_defaults", "select_layers", "to_dense",
]
