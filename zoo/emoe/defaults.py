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
ViT (timm)  (ours, unchanged)             every other block of the last third, counted from the last; 24 / top-4
==========  ============================  =====================================================================

Expert dropout (``moe_drop``): 0.1 in the official BERT and GPT-2 runs (``gelu(dropout(x))`` in the experts), none in
the Llama code; for timm ViTs the FFN's own dropouts are kept and no extra one is added.
"""

from __future__ import annotations

FAMILIES = ("timm", "bert", "gpt2", "llama")
KIND = {"vit": "timm"}  # zoo.families name -> FFN kind, where they differ
EXPERT_DROPOUT = {"bert": 0.1, "gpt2": 0.1, "llama": 0.0, "timm": 0.0}
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
    if family == "timm":
        return 24, 4, sorted(range(num_layers - 1, num_layers - 1 - max(num_layers // 3, 1), -2))
    if family == "llama":
        return 64, 16, list(range(num_layers // 2, num_layers, max(1, num_layers // 8)))
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")


def expert_dropout(family: str) -> float:
    """The official ``moe_drop`` for a family (0.1 for BERT / GPT-2)."""
    return EXPERT_DROPOUT.get(KIND.get(family, family), 0.0)
