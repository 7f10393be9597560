"""The official EMoE settings per model family (qiuzh20/EMoE), scaled by depth for models of another size.

Keyed by the FFN kinds of :mod:`zoo.emoe.convert` (``bert``, ``gpt2``, ``llama``, ``timm``), which map one to one
onto the :mod:`zoo.families` names ``bert``, ``gpt2``, ``llama``, ``vit``.

==========  ============================  =====================================================================
family      official                      here, for ``L`` layers
==========  ============================  =====================================================================
BERT        bert-base: layer 10 of 12,    ``[L - 2]``, 64 experts, top-16 (``Language/README.md``)
            64 experts, top-16
GPT-2       gpt2-xl: layer 44 of 48,      ``[floor(44 L / 48)]`` (12 layers: 11; 6 layers: 5), 64 experts, top-32
            64 experts, top-32            (``Language/README.md``, ``--moe_layers 44 --num_experts 64 --top_k 32``)
Llama       7B (32 layers): from layer    from ``L / 2`` every ``max(1, L / 8)`` layers (32: 16, 20, 24, 28),
            16 every 4th, or from 28      64 experts, top-16 (``EMoE_LLaMA/run_7B_emo.sh``, its first run; the
            every 2nd; 64 experts, top-16 other, ``[28, 30]`` for 32 layers, is ``layers: [-4, -2]``)
ViT (timm)  ViT-S (12 blocks): blocks 8     ``[L - 4, L - 2]`` (from block 0 below 4 blocks), 24 experts, top-4
            and 10 (``num_inter: 2``), 24    (``Vision/README.md``; ``Vision/domainbed/algorithms.py``: ``F`` blocks, then
            experts, top-4                   ``S, F`` twice)
==========  ============================  =====================================================================

Expert dropout (``moe_drop``): 0.1 in the official BERT and GPT-2 runs (``gelu(dropout(x))`` in the experts) and in
the ViT runs after the activation (``dropout(gelu(x))``, ``Vision/domainbed/vision_transformer.py``), none in the
Llama code. Routing: gate noise 1 and capacity factor 1.5 (tutel, fp32 gate) for BERT, GPT-2 and ViT; the Llama code
(``EMoE_LLaMA``) adds no noise and drops no token (capacity factor 0 here: no limit).
"""

from __future__ import annotations

FAMILIES = ("timm", "bert", "gpt2", "llama")
KIND = {"vit": "timm"}  # zoo.families name -> FFN kind, where they differ
EXPERT_DROPOUT = {"bert": 0.1, "gpt2": 0.1, "llama": 0.0, "timm": 0.1}
DROPOUT_AFTER_ACTIVATION = ("timm",)  # dropout(gelu(x)) in the official ViT experts; gelu(dropout(x)) for BERT / GPT-2
GATE_NOISE = {"bert": 1.0, "gpt2": 1.0, "timm": 1.0, "llama": 0.0}
CAPACITY_FACTOR = {"bert": 1.5, "gpt2": 1.5, "timm": 1.5, "llama": 0.0}  # 0: no limit
# families whose official scripts add the auxiliary load-balance loss (weight 0.01); the Llama code has no router loss
BALANCE_LOSS_WEIGHT = {"bert": 0.01, "gpt2": 0.01, "timm": 0.01, "llama": 0.0}


def paper_defaults(family: str, num_layers: int) -> tuple[int, int, list[int]]:
    """``(num_experts, top_k, layer indices)`` of the official scripts for a model family (an FFN kind or a
    :mod:`zoo.families` name: ``vit`` is ``timm``), scaled to ``num_layers``."""
    family = KIND.get(family, family)
    if family == "bert":
        return 64, 16, [max(num_layers - 2, 0)]
    if family == "gpt2":
        return 64, 32, [min(num_layers * 44 // 48, num_layers - 1)]
    if family == "timm":  # ['F'] * (L - 4) + ['S', 'F'] * 2, cut to L blocks
        start = max(num_layers - 4, 0)
        return 24, 4, [i for i in (start, start + 2) if i < num_layers]
    if family == "llama":
        return 64, 16, list(range(num_layers // 2, num_layers, max(1, num_layers // 8)))
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")


def expert_dropout(family: str) -> float:
    """The official ``moe_drop`` for a family (0.1 for BERT / GPT-2 / ViT)."""
    return EXPERT_DROPOUT.get(KIND.get(family, family), 0.0)


def routing(family: str) -> tuple[float, float]:
    """The official ``(gate_noise, capacity_factor)`` of a family (Llama: no noise, no capacity limit)."""
    family = KIND.get(family, family)
    return GATE_NOISE.get(family, 1.0), CAPACITY_FACTOR.get(family, 1.5)
