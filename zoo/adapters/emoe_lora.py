"""``ExpertLoRA``: LoRA on an EMoE model's experts and gates (after :class:`zoo.emoe.Moefy` in ``surgery``).

:class:`~zoo.emoe.layers.EMoEFFN` keeps its experts stacked in 3-D parameters (``fc1_weight (N, m, d)``,
``fc2_weight (N, m, d_out)``, SwiGLU's ``up_weight``), which no ``nn.Linear`` holds, so :class:`~zoo.adapters.LoRA`'s
layer targets cannot reach them. ``peft`` adapts such MoE weights itself: ``LoraConfig(target_parameters=...)``
wraps the layer in ``peft``'s ``ParamWrapper``, which gives each expert its own rank-``r`` pair (``lora_A`` of
``N * r`` rows, split by expert) and adds ``alpha / r * B_e A_e`` to expert ``e``'s weight while the layer runs
(a ``torch.nn.utils.parametrize`` parametrization; the stored weight never changes); ``merge_and_unload`` folds the
updates into the stacked weights. Nothing of LoRA is re-implemented here: this surgery only names the parameters.

Gates: the learned linear router (``Moefy(gate: learned, router: linear)``, a ``(N, d)`` parameter initialised with
the mean keys) gets its own LoRA pair the same way. The cosine router (randomly initialised) can train in full
(``gate: train``) or stay frozen; it reads its projector's weight directly, so no adapter could reach it and
``gate: lora`` on it fails before training. The emergent gate has no weights:
it is the mean of each expert's current keys, read while the adapted layer runs, so it follows the adapted experts.
``peft``'s parameter LoRA has no dropout and no DoRA (it refuses them); ``undo`` merges, as :class:`~zoo.adapters.LoRA`.

YAML::

    surgery:
      - class_path: zoo.emoe.Moefy
        init_args: {num_experts: 24, top_k: 4, gate: learned, router: linear}
      - class_path: zoo.adapters.emoe_lora.ExpertLoRA
        init_args: {r: 4, alpha: 8, gate: lora}
"""

from __future__ import annotations

from torch import nn

from zoo import families
from zoo.adapters import checkpoint as ckpt
from zoo.adapters.lora import LoRA, lora_layers
from zoo.adapters.targets import block_names
from zoo.surgery import frozen_names

__all__ = ["ExpertLoRA"]

GATE_MODES = ("lora", "train", "frozen")


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class ExpertLoRA(LoRA):
    """LoRA adapters on the stacked expert weights (one pair per expert) and the gate of every EMoE layer.

    Args:
        experts: which stacked weights get adapters: some of ``fc1_weight``, ``up_weight`` (SwiGLU), ``fc2_weight``;
            None: every one the layer has.
        gate: ``lora`` (an adapter on the learned linear gate's ``(N, d)`` weight), ``train`` (the learned gate trains in
            full, as a new head would) or ``frozen``. The emergent gate has no weights and follows the adapted keys in any mode.
        blocks: only the EMoE layers inside these blocks (indices, names, ``"i..j"``); None: every EMoE layer.
        targets, parts: more (dense) layers with ordinary LoRA adapters, as :class:`~zoo.adapters.LoRA` (restricted
            to ``blocks`` when both are given), e.g. ``parts: [attention]``.
        r, alpha: rank and scale numerator (update ``alpha / r * B A``) of every adapter.
        trainable, checkpoint: as :class:`~zoo.adapters.LoRA`.
    """

    def __init__(self, experts: list[str] | None = None, gate: str = "lora", blocks: list[int | str] | None = None,
                 targets: str | list[str] | None = None, parts: list[str] | None = None, r: int = 8, alpha: float = 16.0,
                 trainable: list[str] | None = None, checkpoint: str = "trained"):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ExpertLoRA: r={r!r}: the rank must be a positive integer")
        if not alpha > 0:
            raise ValueError(f"ExpertLoRA: alpha={alpha!r}: must be > 0")
        if gate not in GATE_MODES:
            raise ValueError(f"ExpertLoRA: gate={gate!r}: expected one of {GATE_MODES}")
        weights = ("fc1_weight", "up_weight", "fc2_weight")
        if experts is not None and (isinstance(experts, str) or not experts or any(e not in weights for e in experts)):
            raise ValueError(f"ExpertLoRA: experts={experts!r}: expected a non-empty list of {weights} (or null: all)")
        self.experts = None if experts is None else list(experts)
        self.gate = gate
        self.targets = targets if targets is None or isinstance(targets, str) else list(targets)
        self.parts = None if parts is None else [parts] if isinstance(parts, str) else list(parts)
        self.blocks = None if blocks is None else [blocks] if isinstance(blocks, (int, str)) else list(blocks)
        self.r, self.alpha, self.dropout, self.dora, self.bias = r, float(alpha), 0.0, False, "none"
        self.trainable = None if trainable is None else list(trainable)
        self.checkpoint = ckpt.check_mode(checkpoint, "ExpertLoRA")
        self.tuner = None
        self.frozen_before: set[str] = set()
        self.handles: list = []

    def expert_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The EMoE layers to adapt (names relative to the root), in module order."""
        from zoo.emoe import EMoEFFN

        root = families.root_of(model)
        found = [(n, m) for n, m in root.named_modules() if isinstance(m, EMoEFFN)]
        if not found:
            raise ValueError("ExpertLoRA: the backbone has no EMoE layer; put zoo.emoe.Moefy before ExpertLoRA in `surgery`")
        if self.blocks is not None:
            chosen = block_names(model, self.blocks, who="ExpertLoRA")
            kept = [(n, m) for n, m in found if any(_inside(n, b) for b in chosen)]
            if not kept:
                raise ValueError(f"ExpertLoRA: no EMoE layer lies in blocks {chosen}; the EMoE layers are {[n for n, _ in found]}")
            found = kept
        return found

    def targets_of(self, model: nn.Module) -> tuple[list[str], list[str], list[str]]:
        """``(modules, parameters, fully trained)``: ``peft``'s ``target_modules`` and ``target_parameters`` (names
        relative to the root), and the gate parameters that train in full; ranks checked against every matrix."""
        from zoo.emoe import CosineRouter

        modules = self.layers(model) if self.targets is not None or self.parts else []
        params, full, small = [], [], []
        for name, layer in self.expert_layers(model):
            stacks = [w for w in self.experts or layer.pruning_weights if getattr(layer, w, None) is not None]
            if self.experts is not None and len(stacks) < len(self.experts):
                raise ValueError(f"ExpertLoRA: {name} has no {sorted(set(self.experts) - set(stacks))} (SwiGLU models have up_weight)")
            chosen = [(f"{name}.{w}", getattr(layer, w)) for w in stacks]
            router = layer.router
            if isinstance(router, nn.Parameter) and self.gate == "lora":
                chosen.append((f"{name}.router", router))
            elif isinstance(router, CosineRouter) and self.gate == "lora":
                raise ValueError(f"ExpertLoRA: gate='lora' on {name}'s cosine router: it reads its projector's weight directly, so "
                                 "no adapter can reach it; use `router: linear` on Moefy (a (N, d) gate LoRA can adapt), or gate: train / frozen")
            elif router is not None and self.gate == "train":
                full += [f"{name}.router" if isinstance(router, nn.Parameter) else f"{name}.router.{p}" for p, _ in router.named_parameters()]
            for pname, p in chosen:
                if self.r > min(p.shape[-2:]):
                    small.append(f"{pname} {tuple(p.shape)}")
            params += [pname for pname, _ in chosen]
        if small:
            raise ValueError(f"ExpertLoRA: r={self.r} is larger than the smaller dimension of each expert's matrix in "
                             f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}; lower r (or use fewer, wider experts)")
        return modules, params, full

    def transform(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, LoraModel

        root = families.root_of(model)
        if lora_layers(root):
            raise ValueError("ExpertLoRA: the model already has peft adapters; give one adapter surgery all its targets")
        modules, params, full = self.targets_of(model)
        keep = [root.get_parameter(n) for n in full] + [p for n in self.extra_trainable(model) for p in model.get_submodule(n).parameters()]
        self.frozen_before = frozen_names(model)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=modules, target_parameters=params)
        self.tuner = LoraModel(root, config, "default")  # wraps the layers in place, freezes all but the adapters
        inside = {id(p) for p in root.parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(False)
        for p in keep:  # found before peft's wrappers moved them (``...mlp.base_layer.router``)
            p.requires_grad_(True)
        if self.checkpoint == "trained":
            self.handles = ckpt.keep_trained_only(model)
        return model
