"""``LoRA``: low-rank adapters (and weight-decomposed DoRA) through Hugging Face ``peft``, as a model surgery.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021 (https://arxiv.org/abs/2106.09685); Liu et
al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024 (https://arxiv.org/abs/2402.09353; ``peft``'s
``use_dora``). ``transform`` runs ``peft.LoraModel`` on the backbone's root (:func:`zoo.families.root_of`), which
swaps the chosen layers for ``peft`` LoRA layers in place, so ``backbone(x)`` works as before on timm models and
:class:`~zoo.backbones.HFEncoder`; ``undo`` is ``peft``'s ``merge_and_unload``: a plain model of the original classes
computing the same function. The module's head lies outside the backbone and keeps training (PEFT's
``modules_to_save`` for a classifier head); ``trainable`` keeps more of the backbone trainable the same way::

    model:
      class_path: zoo.Classifier
      init_args:
        model: pypi/all-MiniLM-L6-v2
        pretrained: true
        surgery:
          - class_path: zoo.adapters.LoRA
            init_args: {parts: [attention, ffn], blocks: ["2..5"], r: 8, alpha: 16, dropout: 0.1, dora: true}
"""

from __future__ import annotations

from torch import nn

from zoo import families
from zoo.adapters import checkpoint as ckpt
from zoo.adapters.targets import describe, layer_dims, select
from zoo.surgery import Surgery, frozen_names, restore_trainability

BIAS = ("none", "all", "lora_only")


def lora_layers(model: nn.Module) -> list[str]:
    """Names of the ``peft`` adapter layers in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class LoRA(Surgery):
    """LoRA (or DoRA) adapters in the chosen layers of the backbone; every other backbone parameter is frozen.

    Args:
        targets, parts, blocks: where the adapters go (:mod:`zoo.adapters.targets`): a regex or a list of layer
            names (PEFT's ``target_modules`` rules), parts of blocks (``attention``, ``ffn``, ``keys``, ``values``,
            ``block``), and the blocks (indices, names, ``"i..j"``) they are restricted to.
        r, alpha, dropout: rank, scale numerator (the update is ``alpha / r * B A``) and dropout on the adapter's
            input (``peft``'s ``r``, ``lora_alpha``, ``lora_dropout``).
        dora: weight-decomposed LoRA (``peft``'s ``use_dora``): a trained magnitude per output on top of the update.
        bias: ``none``, ``all`` or ``lora_only`` (``peft``): which biases train too.
        trainable: more backbone modules that keep training, by name (equal to, or ending in ``.<name>``), e.g.
            ``[norm]`` for a ViT's final LayerNorm.
        checkpoint: ``trained`` (default): checkpoints hold the adapters and the head, not the frozen base
            (:mod:`zoo.adapters.checkpoint`); ``full``: the whole model.
    """

    def __init__(self, targets: str | list[str] | None = None, parts: list[str] | None = None, blocks: list[int | str] | None = None,
                 r: int = 8, alpha: float = 16.0, dropout: float = 0.0, dora: bool = False, bias: str = "none",
                 trainable: list[str] | None = None, checkpoint: str = "trained"):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA: r={r!r}: the rank must be a positive integer")
        if not alpha > 0:
            raise ValueError(f"LoRA: alpha={alpha!r}: must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout={dropout!r}: expected 0 <= dropout < 1")
        if bias not in BIAS:
            raise ValueError(f"LoRA: bias={bias!r}: expected one of {BIAS}")
        if targets is None and not parts and blocks is None:
            raise ValueError("LoRA: say where the adapters go: `targets` (a regex or layer names), `parts` and/or `blocks`")
        self.targets = targets if targets is None or isinstance(targets, str) else list(targets)
        self.parts = None if parts is None else [parts] if isinstance(parts, str) else list(parts)
        self.blocks = None if blocks is None else [blocks] if isinstance(blocks, (int, str)) else list(blocks)
        self.r, self.alpha, self.dropout, self.dora, self.bias = r, float(alpha), float(dropout), bool(dora), bias
        self.trainable = None if trainable is None else list(trainable)
        self.checkpoint = ckpt.check_mode(checkpoint, "LoRA")
        self.tuner = None  # the peft LoraModel around the root, while applied
        self.frozen_before: set[str] = set()
        self.handles: list = []

    def layers(self, model: nn.Module) -> list[str]:
        """The adapted layers' names (relative to the root), checked against the model (names, ranks)."""
        names = select(model, self.targets, self.parts, self.blocks, who="LoRA")
        root = families.root_of(model)
        small = [describe(n, root.get_submodule(n)) for n in names if self.r > min(layer_dims(root.get_submodule(n)))]
        if small:
            raise ValueError(f"LoRA: r={self.r} is larger than the smaller dimension of {len(small)} of the chosen layers: "
                             f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}; lower r or leave those layers out")
        return names

    def extra_trainable(self, model: nn.Module) -> list[str]:
        """Modules of ``model`` named by ``trainable``; an unknown name fails with the closest ones."""
        import difflib

        names = [n for n, _ in model.named_modules() if n]
        out = []
        for item in self.trainable or []:
            hits = [n for n in names if n == item or n.endswith("." + item)]
            if not hits:
                close = difflib.get_close_matches(item, names, n=5, cutoff=0.5)
                raise ValueError(f"LoRA: trainable module {item!r} is not in {type(model).__name__}; closest: {close}")
            out += hits
        return out

    def transform(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, LoraModel

        root = families.root_of(model)
        if lora_layers(root):
            raise ValueError("LoRA: the model already has peft adapters; give one LoRA surgery all its targets")
        names = self.layers(model)
        extra = self.extra_trainable(model)
        self.frozen_before = frozen_names(model)
        transposed = all(type(root.get_submodule(n)).__name__ == "Conv1D" for n in names)  # GPT-2: weights stored (in, out)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=self.dora, bias=self.bias,
                            target_modules=names, fan_in_fan_out=transposed)
        self.tuner = LoraModel(root, config, "default")  # swaps the layers in place and freezes all but the adapters
        inside = {id(p) for p in root.parameters()}
        for p in model.parameters():  # a wrapper's own parameters outside the root (none for HFEncoder)
            if id(p) not in inside:
                p.requires_grad_(False)
        for name in extra:
            model.get_submodule(name).requires_grad_(True)
        if self.checkpoint == "trained":
            self.handles = ckpt.keep_trained_only(model)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        """Merge the adapters into the weights (``peft``'s ``merge_and_unload``): a plain model, same function, with
        the trainability each parameter had before."""
        if self.tuner is None:
            return model
        self.tuner.merge_and_unload(safe_merge=True)  # the root's layers are replaced in place
        self.tuner = None
        self.handles = ckpt.release(self.handles)
        restore_trainability(model, self.frozen_before)
        return model

