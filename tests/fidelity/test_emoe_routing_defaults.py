"""EMoE: the routing defaults of each family as the official code (qiuzh20/EMoE).

BERT, GPT-2 (``Language/search_glue_no_trainer.py`` -> ``moe_utils.py``) and ViT (``Vision/domainbed/algorithms.py`` ->
``vision_transformer.py``) route through tutel with ``gate_noise: 1.0`` and ``capacity_factor: 1.5``; the Llama code
(``EMoE_LLaMA/moe_models.py``) adds no noise and keeps every token (no capacity: 0 here). The ViT layers are
``['F'] * (L - 4) + ['S', 'F'] * 2`` (``num_inter: 2``, ``Vision/README.md``): blocks 8 and 10 of 12.
"""

from __future__ import annotations

import pytest

from tests.zoo.test_emoe import tiny
from zoo.emoe import Moefy, emoe_layers, paper_defaults
from zoo.emoe.defaults import routing


@pytest.mark.parametrize("family,noise,capacity", [("bert", 1.0, 1.5), ("gpt2", 1.0, 1.5), ("timm", 1.0, 1.5), ("llama", 0.0, 0.0)])
def test_moefy_takes_the_familys_gate_noise_and_capacity(family, noise, capacity):
    assert routing(family) == (noise, capacity)
    model = Moefy(num_experts=4, top_k=2, layers=["*"]).apply(tiny(family))
    layers = emoe_layers(model)
    assert layers and all(m.gate_noise == noise and m.capacity_factor == capacity for _, m in layers)
    chosen = emoe_layers(Moefy(num_experts=4, top_k=2, layers=["*"], gate_noise=0.5, capacity_factor=2.0).apply(tiny(family)))
    assert all(m.gate_noise == 0.5 and m.capacity_factor == 2.0 for _, m in chosen)  # given values win


@pytest.mark.parametrize("depth,layers", [(12, [8, 10]), (24, [20, 22]), (6, [2, 4]), (4, [0, 2]), (3, [0, 2]), (2, [0]), (1, [0])])
def test_vit_layers_are_the_official_ones_cut_to_the_depth(depth, layers):
    official = (["F"] * (depth - 4) + ["S", "F"] * 2)[:depth]  # algorithms.py's moe_layers, indexed by block
    assert [i for i, kind in enumerate(official) if kind == "S"] == layers == paper_defaults("vit", depth)[2]
