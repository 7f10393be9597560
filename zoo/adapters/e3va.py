"""E3VA (Yin et al., "Parameter-efficient is not sufficient: Exploring Parameter, Memory, and Time Efficient Adapter
Tuning for Dense Predictions", ACM MM 2024, arXiv 2306.09729; no official code was found): low-rank adapters on a
*gradient highway* beside the frozen backbone::

    model:
      class_path: zoo.Classifier
      init_args:
        surgery:
          - class_path: zoo.adapters.e3va.E3VA
            init_args: {rank: 16}

The backbone is frozen and runs as usual; since none of its parameters (nor its input) needs a gradient, autograd
records nothing inside it: no activation of it is kept for backward and backward never enters it. Forward hooks read
each block's update (``tap: residual``: block output minus block input, i.e. what its attention and MLP branches add,
the activations the paper's Fig. 2 sends to the adapters; ``tap: block``: the block output) and feed it to that block's
adapter ``up(down(.))`` (rank ``rank``, ``up`` zero at start). The adapters are parallel, not stacked: their outputs
are summed on the highway (through the backbone's own downsampling layers between stages, e.g. Swin's patch merging,
as the paper does), and the sum is added to the last block's output. So the gradient goes from the loss through the
tail (final norm, pooling, head) straight to each adapter, and training memory and time fall with the backbone's
backward gone.

``undo``: the adapters cannot be folded into the backbone's weights (the highway adds block updates after the last
block, which no weight of the plain model computes); the model is returned in the paper's inference form: the
original backbone object (its class, its weights untouched) with the highway submodule ``e3va`` and its hooks, and
the parameters E3VA froze thawed. When every ``up`` projection is still zero the highway is removed: the exact plain
model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from zoo import families
from zoo.adapters import checkpoint as ckpt
from zoo.surgery import Surgery

__all__ = ["E3VA", "Highway", "HighwayAdapter", "highway_of"]

TAPS = ("residual", "block")


class HighwayAdapter(nn.Module):
    """``scale * up(down(x))``: down ``dim -> rank`` Kaiming-uniform (``nn.Linear``'s init), up ``rank -> dim`` zero."""

    def __init__(self, dim: int, rank: int, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


def _hidden(x):
    """The hidden states of a block's input or output (Hugging Face blocks return tuples)."""
    return x[0] if isinstance(x, (tuple, list)) else x


class Highway(nn.Module):
    """The adapters of one backbone and the hooks that feed them (a submodule ``e3va`` of the backbone's root)."""

    def __init__(self, blocks: list[str], stages: list[str], entries: dict[str, str], dims: list[int], rank: int, scale: float, tap: str):
        super().__init__()
        self.blocks, self.stages, self.entries, self.tap = blocks, stages, entries, tap
        self.adapters = nn.ModuleList(HighwayAdapter(d, rank, scale) for d in dims)
        self.taps: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def attach(self, root: nn.Module) -> None:
        self.detach_hooks()
        for i, name in enumerate(self.blocks):
            block = root.get_submodule(name)
            if self.tap == "residual":
                self.handles.append(block.register_forward_pre_hook(functools.partial(self._input, i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(functools.partial(self._output, i)))

    def detach_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _input(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        self.inputs[i] = _hidden(x).detach()

    def _output(self, i: int, module: nn.Module, args: tuple, output):
        out = _hidden(output)
        self.taps[i] = out.detach() - self.inputs.pop(i) if self.tap == "residual" else out.detach()
        if i < len(self.blocks) - 1:
            return None
        highway = self.highway(module)
        return out + highway if not isinstance(output, (tuple, list)) else type(output)((output[0] + highway, *output[1:]))

    def highway(self, last_block: nn.Module) -> torch.Tensor:
        """Sum of the adapters' outputs, passed through each stage's entry (downsampling) on the way."""
        root = self._root
        h = None
        for i, adapter in enumerate(self.adapters):
            if h is not None and self.stages[i] != self.stages[i - 1] and self.stages[i] in self.entries:
                h = root.get_submodule(self.entries[self.stages[i]])(h)
            a = adapter(self.taps.pop(i))
            h = a if h is None else h + a
        return h

    def is_zero(self) -> bool:
        return all(not a.up.weight.any() for a in self.adapters)


def _width(layer: nn.Module, transposed: bool) -> int:
    return layer.weight.shape[1] if transposed else layer.weight.shape[0]


class E3VA(Surgery):
    """Add E3VA's highway adapters to every block of a transformer backbone and freeze the backbone.

    Args:
        rank: the adapters' low rank (16 here; the paper's value could not be checked without its code).
        scale: multiplies each adapter's output.
        tap: ``residual`` (a block's attention + MLP update, the paper's taps) or ``block`` (the block's output).
        checkpoint: ``trained`` (the adapters and the head; the base is rebuilt from the model's name,
            :mod:`zoo.adapters.checkpoint`) or ``full``.
    """

    sharding = "the highway hooks on the blocks are not tested on DTensor shards"

    def __init__(self, rank: int = 16, scale: float = 1.0, tap: str = "residual", checkpoint: str = "trained"):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"E3VA: rank={rank!r} must be an integer >= 1")
        if tap not in TAPS:
            raise ValueError(f"E3VA: tap={tap!r}: expected one of {TAPS}")
        self.rank, self.scale, self.tap = rank, float(scale), tap
        self.checkpoint = ckpt.check_mode(checkpoint, "E3VA")
        self.handles: list = []

    def transform(self, model: nn.Module) -> nn.Module:
        family = families.family_of(model, "E3VA")
        root = families.root_of(model)
        if hasattr(root, "e3va"):
            raise ValueError("E3VA: the model already has an E3VA highway")
        if not family.ffn_layers:
            raise ValueError(f"E3VA: the {family.name} family has blocks but no known FFN output width (its blocks change "
                             f"width and stage inside them); E3VA's highway needs transformer blocks: "
                             f"{[f.name for f in families.FAMILIES if f.ffn_layers]}")
        pairs = family.blocks(root)
        dims = [_width(root.get_submodule(f"{b}.{family.ffn_layers[-1]}"), family.ffn_transposed) for b, _ in pairs]
        if self.rank > min(dims):
            raise ValueError(f"E3VA: rank={self.rank} is larger than the blocks' width {min(dims)}")
        entries = {s: f"{s}.{family.stage_entry}" for _, s in pairs if family.stage_entry and hasattr(root.get_submodule(s), family.stage_entry)}
        stages = [s for _, s in pairs]
        for j in range(1, len(pairs)):
            if dims[j] != dims[j - 1] and stages[j] not in entries:
                raise ValueError(f"E3VA: the width changes at {pairs[j][0]} ({dims[j - 1]} -> {dims[j]}) with no downsampling "
                                 "layer to carry the highway")
        self.frozen = [n for n, p in root.named_parameters() if p.requires_grad]
        root.requires_grad_(False)
        param = next(root.parameters())
        highway = Highway([b for b, _ in pairs], stages, entries, dims, self.rank, self.scale, self.tap).to(param.device)
        root.e3va = highway
        object.__setattr__(highway, "_root", root)  # not a submodule (a cycle); the entries are called through it
        highway.attach(root)
        if self.checkpoint == "trained":
            self.handles = ckpt.keep_trained_only(model)
        return model

    def undo(self, model: nn.Module) -> nn.Module:
        """The paper's inference form (the highway kept, see the module docstring), or the exact plain model when the
        highway is still zero; the parameters E3VA froze are thawed either way."""
        root = families.root_of(model)
        highway = getattr(root, "e3va", None)
        if isinstance(highway, Highway) and highway.is_zero():
            highway.detach_hooks()
            del root.e3va
        ckpt.release_and_thaw(self, root)
        return model


def highway_of(model: nn.Module) -> Highway | None:
    return next((m for m in model.modules() if isinstance(m, Highway)), None)
