"""Which layers of a backbone an adapter goes into: by name pattern, or by parts of blocks from :mod:`zoo.families`.

Names are relative to :func:`zoo.families.root_of` (the backbone itself; for an :class:`~zoo.backbones.HFEncoder`
the wrapped Hugging Face model, e.g. ``encoder.layer.0.attention.self.query``), as everywhere in the zoo.

* ``targets``: a string is a regular expression matched in full against the names of the adaptable layers
  (PEFT's rule for a string ``target_modules``); a list holds names, each matching a module whose name equals it
  or ends with ``.<name>`` (PEFT's rule for a list: ``[query, value]`` is every BERT query and value projection).
  A matched module that is not itself adaptable (``blocks.0.attn``) stands for the adaptable layers inside it.
* ``parts``: ``attention``, ``ffn`` (both FFN layers), ``keys`` (the FFN's first layer: its input projection; Llama
  ``gate_proj`` and ``up_proj``), ``values`` (the FFN's last layer, the output projection), ``block`` (every
  adaptable layer of a block).
* ``blocks``: which blocks the selection is restricted to: indices (negative from the end), block names
  (``encoder.layer.3``) or inclusive ranges ``"i..j"``; None is every block. ``targets`` and ``parts`` add up, and
  ``blocks`` restricts both (like PEFT's ``layers_to_transform``).

Adaptable layers are the ones PEFT's LoRA supports: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and
Hugging Face's ``Conv1D`` (GPT-2). Every selector must select something, else it fails with the closest names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from zoo import families

PARTS = ("attention", "ffn", "keys", "values", "block")
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


def _conv1d_type() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for vision-only use
        return ()
    return (Conv1D,)


def adaptable(module: nn.Module) -> bool:
    """Whether PEFT's LoRA can adapt ``module`` (a dense, convolution or embedding layer)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, *_conv1d_type()))


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(inputs, outputs)`` of the layer's weight seen as a matrix: a LoRA rank above ``min`` of them adds nothing."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        fan_in = module.in_channels // module.groups
        for k in module.kernel_size:
            fan_in *= k
        return fan_in, module.out_channels
    if _conv1d_type() and isinstance(module, _conv1d_type()):
        return module.weight.shape[0], module.weight.shape[1]  # stored transposed: (in, out)
    raise TypeError(f"{type(module).__name__} is not an adaptable layer")


def describe(name: str, module: nn.Module) -> str:
    """``blocks.0.attn.qkv (Linear 32->96)``: a layer for messages."""
    i, o = layer_dims(module)
    return f"{name} ({type(module).__name__} {i}->{o})"


def adaptable_layers(root: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable layer of ``root`` by name, in module order (layers inside PEFT adapters excluded)."""
    out = {}
    for name, module in root.named_modules():
        if name and adaptable(module) and not any(part.startswith("lora_") for part in name.split(".")):
            out[name] = module
    return out


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _close(word: str, names: Sequence[str]) -> str:
    """``closest: a, b`` (whole names and their last parts) for a message, or a few valid names."""
    tails = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(word, list(names), n=4, cutoff=0.5) + difflib.get_close_matches(word, tails, n=4, cutoff=0.5)
    if close:
        return f"closest: {', '.join(dict.fromkeys(close))}"
    return f"layer names end in: {', '.join(tails[:20])}"


def block_names(backbone: nn.Module, blocks: Sequence[int | str] | None, who: str = "adapters") -> list[str]:
    """Block names (from :func:`zoo.families.blocks`) for ``blocks``: indices, names or ``"i..j"``; None: all."""
    names = [b for b, _ in families.family_of(backbone, who=who).blocks(families.root_of(backbone))]
    if blocks is None:
        return names
    if isinstance(blocks, (str, int)):
        blocks = [blocks]
    chosen: list[str] = []
    n = len(names)

    def index(i: int, item: object) -> str:
        if not -n <= i < n:
            raise ValueError(f"{who}: block {item!r} is out of range: the model has {n} blocks (0..{n - 1})")
        return names[i]

    for item in blocks:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"{who}: blocks item {item!r}: expected an index, a block name or a range 'i..j'")
        if isinstance(item, int):
            chosen.append(index(item, item))
        elif m := _RANGE.match(item):
            first, last = (int(g) % n if -n <= int(g) < n else int(g) for g in m.groups())
            index(first, item), index(last, item)
            if last < first:
                raise ValueError(f"{who}: blocks range {item!r} is empty (first block after the last)")
            chosen += names[first:last + 1]
        elif item in names:
            chosen.append(item)
        else:
            raise ValueError(f"{who}: unknown block {item!r}; blocks are {names[0]} .. {names[-1]} ({n}), or indices, or 'i..j'")
    return sorted(set(chosen), key=names.index)


def part_layers(backbone: nn.Module, block: str, part: str, layers: dict[str, nn.Module], who: str) -> list[str]:
    """The adaptable layers of one ``part`` of ``block`` (names relative to the root)."""
    family = families.family_of(backbone, who=who)
    if part == "block":
        prefixes = [block]
    elif part == "attention":
        if not family.attention:
            raise ValueError(f"{who}: parts=[attention] on a {family.name} model: the family has no attention; "
                             f"families with attention: {[f.name for f in families.FAMILIES if f.attention]} (or choose layers by name with `targets`)")
        prefixes = [f"{block}.{a}" for a in family.attention]
    else:
        if not family.ffn_layers:
            raise ValueError(f"{who}: parts=[{part}] on a {family.name} model: the zoo knows no FFN (keys/values layers) of "
                             f"this family; families with one: {[f.name for f in families.FAMILIES if f.ffn_layers]} "
                             f"(zoo/families.py; or choose layers by name with `targets`)")
        ffn = list(family.ffn_layers)
        chosen = {"ffn": ffn, "keys": ffn[:-1], "values": ffn[-1:]}[part]
        return [f"{block}.{f}" for f in chosen]
    return [n for n in layers if any(_inside(n, p) for p in prefixes)]


def _match_item(item: str, root: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    hits = [n for n, _ in root.named_modules() if n and (n == item or n.endswith("." + item))]
    return [n for n in layers if any(_inside(n, h) for h in hits)]


def select(backbone: nn.Module, targets: str | Sequence[str] | None = None, parts: Sequence[str] | None = None,
           blocks: Sequence[int | str] | None = None, who: str = "adapters") -> list[str]:
    """Names (relative to the root, in module order) of the adaptable layers chosen by ``targets``, ``parts`` and
    ``blocks`` (see the module docstring). A selector that selects nothing fails, naming the closest layers."""
    root = families.root_of(backbone)
    layers = adaptable_layers(root)
    if not layers:
        raise ValueError(f"{who}: {type(root).__name__} has no layer an adapter can go into (Linear, Conv, Embedding)")
    if isinstance(parts, str):
        parts = [parts]
    for part in parts or []:
        if part not in PARTS:
            raise ValueError(f"{who}: unknown part {part!r}; expected some of {PARTS}")
    if targets is None and not parts and blocks is None:
        raise ValueError(f"{who}: say where the adapters go: `targets` (a regex or layer names), `parts` {PARTS}, and/or `blocks`")
    chosen: list[str] = []
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"{who}: targets={targets!r} is not a regular expression ({err})") from err
        hits = [n for n in layers if pattern.fullmatch(n)]
        if not hits:
            raise ValueError(f"{who}: targets={targets!r} (a regex, matched in full) matches no adaptable layer; "
                             f"{_close(targets, list(layers))}")
        chosen += hits
    elif targets is not None:
        for item in targets:
            hits = _match_item(str(item), root, layers)
            if not hits:
                raise ValueError(f"{who}: target {item!r} matches no adaptable layer (names end in it, relative to "
                                 f"{type(root).__name__}); {_close(str(item), list(layers))}")
            chosen += hits
    in_blocks = None
    if parts or blocks is not None:
        in_blocks = block_names(backbone, blocks, who)
    if parts or (blocks is not None and targets is None):
        for block in in_blocks:
            for part in parts or ["block"]:
                for name in part_layers(backbone, block, part, layers, who):
                    if name not in layers:
                        raise ValueError(f"{who}: the {part} layer {name!r} is missing or not adaptable in this model")
                    chosen.append(name)
    if in_blocks is not None:
        kept = [n for n in chosen if any(_inside(n, b) for b in in_blocks)]
        if not kept:
            raise ValueError(f"{who}: none of the selected layers ({sorted(set(chosen))[:6]}...) lies in blocks {in_blocks}")
        chosen = kept
    return [n for n in layers if n in set(chosen)]
