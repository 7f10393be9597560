"""``KeysValues``: finetune only the keys or only the values of the FFNs of chosen blocks, freeze the rest.

Qiu et al., "Empirical Study on Updating Key-Value Memories in Transformer Feed-forward Layers", 2024
(https://arxiv.org/abs/2402.12233; official code qiuzh20/Tuning-keys-v.s.-values). An FFN ``W_V f(W_K x)`` is a
key-value memory: the first layer's rows are keys (which patterns fire), the second layer's columns values (what
they write). The paper compares updating only the keys with updating only the values.

Which layers: :mod:`zoo.families`' ``ffn_layers``: keys are the input projection(s) (ViT/Swin ``mlp.fc1``, BERT
``intermediate.dense``, GPT-2 ``mlp.c_fc``, Llama ``mlp.gate_proj`` and ``mlp.up_proj``), values the output
projection (``mlp.fc2``, ``output.dense``, ``mlp.c_proj``, ``mlp.down_proj``). The official Llama runs tune them
through LoRA with ``bias="none"`` (``llama2_classification_multi_tasks.py``: ``--target_modules q_proj v_proj
up_proj`` / ``gate_proj`` / ``down_proj``, ``lora_alpha=16``); that is :class:`~zoo.adapters.LoRA` with
``targets: [q_proj, v_proj, up_proj]`` (or ``parts: [keys]``). This surgery tunes the full weights instead (the
paper's BERT/ViT comparison), biases only with ``bias: true`` (the official runs train none)::

    surgery:
      - class_path: zoo.adapters.KeysValues
        init_args: {part: keys, blocks: ["4..5"]}
"""

from __future__ import annotations

from torch import nn

from zoo import families
from zoo.adapters import checkpoint as ckpt
from zoo.adapters.targets import select
from zoo.surgery import Surgery, frozen_names, restore_trainability

PARTS = ("keys", "values")


class KeysValues(Surgery):
    """Train only the FFN keys (``part: keys``) or values (``part: values``) of ``blocks``; ``undo`` gives back the
    trainability every parameter had before (the model's classes never change).

    Args:
        part: ``keys`` (the FFN's first layer) or ``values`` (its last layer).
        blocks: block indices, names or ``"i..j"`` ranges (:mod:`zoo.adapters.targets`); None: every block.
        bias: train those layers' biases too (the official code trains no bias).
        checkpoint: ``trained`` (default): checkpoints hold the trained layers and the head, the frozen base is
            rebuilt from the model's name (:mod:`zoo.adapters.checkpoint`); ``full``: the whole model.
    """

    def __init__(self, part: str = "keys", blocks: list[int | str] | None = None, bias: bool = False, checkpoint: str = "trained"):
        if part not in PARTS:
            raise ValueError(f"KeysValues: part={part!r}: expected one of {PARTS}")
        self.part = part
        self.blocks = None if blocks is None else [blocks] if isinstance(blocks, (int, str)) else list(blocks)
        self.bias = bool(bias)
        self.checkpoint = ckpt.check_mode(checkpoint, "KeysValues")
        self.frozen_before: set[str] | None = None
        self.handles: list = []

    def layers(self, model: nn.Module) -> list[str]:
        """The trained layers' names (relative to the root); a family with no known FFN fails here."""
        family = families.family_of(model, who="KeysValues")
        if not family.ffn_layers:
            raise ValueError(f"KeysValues: a {family.name} model has no FFN the zoo knows (keys and values are an FFN's "
                             f"two layers); families with one: {[f.name for f in families.FAMILIES if f.ffn_layers]}")
        return select(model, parts=[self.part], blocks=self.blocks, who="KeysValues")

    def transform(self, model: nn.Module) -> nn.Module:
        names = self.layers(model)
        root = families.root_of(model)
        if self.frozen_before is None:
            self.frozen_before = frozen_names(model)
        model.requires_grad_(False)
        for name in names:
            layer = root.get_submodule(name)
            layer.weight.requires_grad_(True)
            if self.bias and getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad_(True)
        if self.checkpoint == "trained":
            self.handles = ckpt.keep_trained_only(model)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        restore_trainability(model, self.frozen_before)
        self.frozen_before = None
        self.handles = ckpt.release(self.handles)
        return model
