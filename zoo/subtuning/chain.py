"""A backbone seen as ``prefix -> blocks -> tail``, runnable from any block (SubTuning's split forward pass)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from zoo import families
from zoo.subtuning.layers import covered


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the input of a layer."""


class LayerChain:
    """A backbone seen as ``prefix -> blocks[0..n) -> tail``, runnable from any block.

    ``prefix(x, s)`` runs the model up to the input of block ``s`` (``s == n``: the last block's output);
    ``suffix(h, ctx, x, s)`` runs blocks ``s..n`` and the tail. Together they equal ``backbone(x)``.
    The blocks come from :mod:`zoo.families`. A plain object (not an ``nn.Module``), so it registers no
    parameters twice.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.root = families.root_of(backbone)
        self.family = families.family_of(backbone, who="SubTuning")
        self.names = [b for b, _ in families.blocks(backbone)]
        self.layers = [self.root.get_submodule(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.layers)

    def start_of(self, trainable: Sequence[str]) -> int:
        """Index of the first block inside a trainable layer (``len(self)`` when none is)."""
        return next((i for i, n in enumerate(self.names) if covered(n, trainable)), len(self))

    def prefix(self, x: Any, start: int) -> tuple[torch.Tensor, tuple[tuple, dict]]:
        """The input of block ``start`` (and the other arguments the blocks take, e.g. an attention mask)."""
        captured: dict[str, Any] = {}

        def pre_hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        def hook(module, args, output):
            captured["args"], captured["kwargs"] = (output[0] if isinstance(output, tuple) else output,), {}
            raise _Stop

        if start < len(self):
            handle = self.layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            handle = self.layers[-1].register_forward_hook(hook)
        try:
            self.backbone(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError(f"the forward pass of {type(self.root).__name__} never reached {self.names[min(start, len(self) - 1)]}")
        args, kwargs = captured["args"], dict(captured["kwargs"])
        h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        # Replayed layers must not write to (or read from) a KV cache: several suffixes may share a context.
        if "past_key_values" in kwargs:
            kwargs["past_key_values"] = None
        if "layer_past" in kwargs:
            kwargs["layer_past"] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return h, (rest, kwargs)

    def run(self, h: torch.Tensor, ctx: tuple[tuple, dict], first: int, last: int, layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Blocks ``first..last`` (exclusive); ``layers`` replaces ``self.layers`` (multi-task branches)."""
        rest, kwargs = ctx
        layers = self.layers if layers is None else layers
        for i in range(first, last):
            h = layers[i](h, *rest, **kwargs)
            if isinstance(h, tuple):
                h = h[0]
        return h

    def tail(self, h: torch.Tensor, x: Any) -> torch.Tensor:
        """From the last block's output to the pooled features (:func:`zoo.families.features`)."""
        return families.features(self.backbone, h, x, self.family)

    def suffix(self, h: torch.Tensor, ctx: tuple[tuple, dict], x: Any, start: int, layers: Sequence[nn.Module] | None = None) -> torch.Tensor:
        return self.tail(self.run(h, ctx, start, len(self), layers), x)
