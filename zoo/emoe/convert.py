"""moefy / demoefy: turn the dense FFNs of a model into :class:`~zoo.emoe.layers.EMoEFFN` layers, and back.

Supported FFNs: timm ``Mlp`` (ViT, DeiT...), HF BERT-like layers (``intermediate.dense`` +
``output.dense``; the output's dropout, residual and LayerNorm are kept), HF GPT-2-like MLPs
(``c_fc``/``c_proj`` ``Conv1D``) and HF Llama-like SwiGLU MLPs (``gate_proj``/``up_proj``/``down_proj``).
Where the FFNs of a backbone are, and their dense layers, come from :mod:`zoo.families`; the FFN kinds below
(``timm``, ``bert``, ``gpt2``, ``llama``) are the FFN layouts of the families in :data:`LAYOUTS`.

    model = build_backbone("pypi/all-MiniLM-L6-v2", pretrained=True)
    emoe = moefy(model, num_experts=64, top_k=16, layers=[4])       # a converted copy
    dense = demoefy(emoe)                                            # back to BertIntermediate/Linear
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Sequence

import torch
from torch import nn

from zoo import families
from zoo.emoe.defaults import DROPOUT_AFTER_ACTIVATION, FAMILIES, expert_dropout as default_dropout, paper_defaults  # noqa: F401 (re-exported)
from zoo.emoe.defaults import routing as default_routing
from zoo.emoe.layers import EMoEFFN, _check_args
from zoo.emoe.routing import check_routing

SUPPORTED = (
    "timm Mlp (fc1/act/fc2, no inner norm), HF BERT-like layers (intermediate.dense + output.dense), "
    "HF GPT-2-like MLPs (c_fc/c_proj Conv1D), HF Llama-like MLPs (gate_proj/up_proj/down_proj)"
)
# FFN kind -> the zoo.families family whose FFN layout (dense layers, Conv1D or not) it is
LAYOUTS = {"timm": "vit", "bert": "bert", "gpt2": "gpt2", "llama": "llama"}
KIND_OF = {family: kind for kind, family in LAYOUTS.items()}
KIND_OF["swin"] = "timm"  # Swin's FFNs are timm Mlp blocks (EMoE's layer reshapes any leading dimensions)
# what EMoE carries over beyond the dense layers: the activation, and the dropouts (EMoEFFN argument -> attribute)
ACT = {"timm": "act", "bert": "intermediate.intermediate_act_fn", "gpt2": "act", "llama": "act_fn"}
DROPOUTS = {"timm": {"hidden_dropout": "drop1", "out_dropout": "drop2"}, "gpt2": {"out_dropout": "dropout"}}
DETECT_ORDER = ("llama", "gpt2", "bert", "timm")  # type-based detection (the fallback) tries the kinds in this order


def _placeholder(module: nn.Module, keep: nn.Module) -> nn.Module:
    """``module`` with its parameters replaced by empty ones (except those of submodules shared with
    ``keep``, e.g. the activation): a template to rebuild the dense block later."""
    shared = {id(m) for m in keep.modules()}
    for sub in module.modules():
        if id(sub) in shared:
            continue
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(p.new_empty(0), requires_grad=p.requires_grad))
    return module



def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _get(module: nn.Module, path: str):
    """``module``'s attribute at the dotted ``path``, None where it is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def layers_of(kind: str) -> tuple[tuple[str, ...], bool]:
    """The dense layers of an FFN of ``kind`` relative to the FFN module (input projection(s) first, output last),
    and whether they are transposed ``Conv1D``: the registry's :attr:`~zoo.families.Family.ffn_layers`."""
    family = families.by_name(LAYOUTS[kind])
    cut = len(family.ffn_module) + 1 if family.ffn_module else 0
    return tuple(n[cut:] for n in family.ffn_layers), family.ffn_transposed


def _fits(module: nn.Module, kind: str) -> bool:
    """Whether ``module`` has the layout of ``kind``: its dense layers, and the activation EMoE carries over."""
    names, transposed = layers_of(kind)
    dense = _is_conv1d if transposed else (lambda m: isinstance(m, nn.Linear))
    if not all(dense(_get(module, n)) for n in names) or _get(module, ACT[kind]) is None:
        return False
    if kind == "timm":  # other timm MLPs (GluMlp, SwiGLU...) have fc1/fc2 too, with another meaning
        from timm.layers import Mlp

        return isinstance(module, Mlp)
    return True


def ffn_family(module: nn.Module) -> str | None:
    """``timm``/``bert``/``gpt2``/``llama`` when ``module`` is a supported FFN block, else None (by its type and layers)."""
    return next((kind for kind in DETECT_ORDER if _fits(module, kind)), None)


def _timm_norm_ok(module: nn.Module) -> bool:
    return isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)


def _convert(module: nn.Module, family: str, **kw) -> tuple[EMoEFFN, dict[str, nn.Module]]:
    """Build the EMoE layer of a dense block, and the emptied dense modules to restore it later."""
    names, transposed = layers_of(family)
    first, *up, last = (module.get_submodule(n) for n in names)
    t = (lambda w: w.t()) if transposed else (lambda w: w)
    if up:  # SwiGLU: act(gate) * up
        kw.update(up_weight=t(up[0].weight), up_bias=up[0].bias)
    dropouts = {arg: getattr(module, attr) for arg, attr in DROPOUTS.get(family, {}).items()}
    ffn = EMoEFFN(t(first.weight), first.bias, t(last.weight), last.bias, _get(module, ACT[family]), **dropouts, **kw)
    # BERT: the EMoE layer replaces ``intermediate`` and ``output.dense`` (``output`` keeps its residual and LayerNorm)
    templates = {"intermediate": module.intermediate, "output.dense": module.output.dense} if family == "bert" else {"": module}
    ffn.family = family
    ffn.train(module.training)  # the new layer's own dropout follows the model's mode
    return ffn, templates


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def _param(t: torch.Tensor | None, like: nn.Parameter) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=like.requires_grad)


def _restore(ffn: EMoEFFN) -> dict[str, nn.Module]:
    """Fill the dense templates with the experts' weights (original order); returns ``{rel path: module}``. Layer
    widths follow the weights (structured pruning may have made the experts narrower, see ``EMoEFFN.keep_neurons``)."""
    restored = _fill(ffn)
    for module in restored.values():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = m.weight.shape
            elif _is_conv1d(m):
                m.nf = m.weight.shape[1]
    return restored


def _template_layer(templates: dict[str, nn.Module], name: str) -> nn.Module:
    """The dense layer ``name`` (relative to the FFN module) inside the saved templates."""
    key = next(k for k in templates if not k or name == k or name.startswith(k + "."))
    return templates[key] if name == key else templates[key].get_submodule(name[len(key) + 1 if key else 0:])


def _fill(ffn: EMoEFFN) -> dict[str, nn.Module]:
    w, t, like = ffn.dense_weights(), ffn._dense_templates, ffn.fc1_weight
    names, transposed = layers_of(ffn.family)
    first, *up, last = (_template_layer(t, n) for n in names)
    tr = (lambda x: x.t().contiguous()) if transposed else (lambda x: x)
    first.weight, first.bias = _param(tr(w["fc1_weight"]), like), _param(w["fc1_bias"], like)
    if up:
        up[0].weight, up[0].bias = _param(tr(w["up_weight"]), like), _param(w["up_bias"], like)
    last.weight, last.bias = _param(tr(w["fc2_weight"]), like), _param(w["fc2_bias"], like)
    return dict(t)


def ffn_width(module: nn.Module, family: str) -> int:
    """Neurons of a supported dense FFN block (the rows of its first dense layer's weight)."""
    names, transposed = layers_of(family)
    return module.get_submodule(names[0]).weight.shape[1 if transposed else 0]


def _family_ffns(backbone: nn.Module, family: families.Family) -> list[tuple[str, str]]:
    """``(name relative to backbone, kind)`` of the blocks' FFNs (:func:`zoo.families.ffns`) that have EMoE's layout
    for ``family``; none for a family EMoE does not support (CNNs)."""
    kind = KIND_OF.get(family.name)
    if kind is None:
        return []
    root = families.root_of(backbone)
    at = next(n for n, m in backbone.named_modules() if m is root)  # "model" inside an HFEncoder
    units = ((f"{at}.{unit}" if at else unit, root.get_submodule(unit)) for unit in families.ffns(backbone))
    return [(name, kind) for name, module in units if _fits(module, kind) and (kind != "timm" or _timm_norm_ok(module))]


def find_ffns(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, family)`` of every supported dense FFN block of ``model``, in model order.

    A backbone of a known family (:mod:`zoo.families`, the model itself or anywhere inside it) gives its blocks'
    FFNs from the registry. Elsewhere, in a model of no known family (a bare timm ``Mlp``, a Hugging Face model
    outside an ``HFEncoder``), the FFNs are recognised by their type (:func:`ffn_family`): the fallback.
    """
    found, inside = [], ()
    for name, module in model.named_modules():
        if inside and any(name.startswith(p + ".") for p in inside):
            continue
        known = families.find_family(module)
        if known is not None:
            found += [(f"{name}.{n}" if name else n, kind) for n, kind in _family_ffns(module, known)]
            if not name:
                break
            inside = (*inside, name)
            continue
        family = ffn_family(module)
        if family == "timm" and not _timm_norm_ok(module):
            family = None
        if family:
            found.append((name, family))
            inside = (*inside, name)
    return found


def emoe_layers(model: nn.Module) -> list[tuple[str, EMoEFFN]]:
    """``(name, layer)`` of every :class:`EMoEFFN` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EMoEFFN)]


def select_layers(found: list[tuple[str, str]], layers: Sequence[int | str] | None) -> list[tuple[str, str]]:
    """Pick FFNs by index among ``found`` (negative allowed) or by name / fnmatch pattern; None: all."""
    if layers is None:
        return list(found)
    if isinstance(layers, (int, str)):
        layers = [layers]
    names = [n for n, _ in found]
    chosen: list[int] = []
    for sel in layers:
        if isinstance(sel, bool) or not isinstance(sel, (int, str)):
            raise ValueError(f"layers: {sel!r} is neither an FFN index nor a name")
        if isinstance(sel, int):
            if not -len(found) <= sel < len(found):
                raise ValueError(f"layers: index {sel} is out of range; the model has {len(found)} supported FFNs: {names}")
            hits = [sel % len(found)]
        else:
            hits = [i for i, n in enumerate(names) if n == sel or fnmatch.fnmatchcase(n, sel)]
            if not hits:
                raise ValueError(f"layers: {sel!r} names no supported FFN. Supported FFNs of this model: {names} ({SUPPORTED})")
        chosen += [i for i in hits if i not in chosen]
    return [found[i] for i in sorted(chosen)]


def moefy(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    layers: Sequence[int | str] | None = None,
    inplace: bool = False,
    gate: str = "emergent",
    gate_noise: float | None = 0.0,
    balance_loss: bool = False,
    dispatch: str = "sparse",
    seed: int = 0,
    cluster_inits: int = 10,
    router: str = "cosine",
    capacity_factor: float | None = None,
    batch_prioritized: bool = True,
    fp32_gate: bool = True,
    expert_dropout: float | None = None,
    aux_loss: str = "load_importance",
) -> nn.Module:
    """Turn the chosen dense FFNs of ``model`` into :class:`EMoEFFN` layers (a copy unless ``inplace``).

    ``layers``: indices into :func:`find_ffns` (model order, negative allowed) or names/fnmatch
    patterns of the FFN blocks (for BERT-like models the layer, e.g. ``model.encoder.layer.4``); None: all.
    Returns the converted model (an :class:`EMoEFFN` when ``model`` is itself one FFN block). All arguments are checked (widths, ``top_k``, names) before any weight is touched.
    The routing arguments are :class:`EMoEFFN`'s (official defaults); ``expert_dropout`` and ``capacity_factor`` None:
    the family's official ones (:mod:`zoo.emoe.defaults`: dropout 0.1 for BERT / GPT-2 / ViT, after the activation for
    ViT; capacity 1.5, none for Llama). ``gate_noise`` is 0 by default here (a deterministic conversion); None, as
    :class:`Moefy` passes by default, is the family's official noise (1, none for Llama).
    """
    _check_args(num_experts, top_k, gate, dispatch, gate_noise or 0.0, cluster_inits=cluster_inits)
    check_routing(router, capacity_factor or 0.0, aux_loss, expert_dropout or 0.0)
    found = find_ffns(model)
    if not found:
        already = " (it is already converted)" if emoe_layers(model) else ""
        raise ValueError(f"{type(model).__name__} has no supported FFN block{already}. Supported: {SUPPORTED}")
    targets = select_layers(found, layers)
    for name, family in targets:
        _check_args(num_experts, top_k, gate, dispatch, gate_noise or 0.0, ffn_width(model.get_submodule(name), family))
    if not inplace:
        model = copy.deepcopy(model)
    kw = dict(num_experts=num_experts, top_k=top_k, gate=gate, balance_loss=balance_loss, dispatch=dispatch, seed=seed,
              cluster_inits=cluster_inits, router=router, batch_prioritized=batch_prioritized, fp32_gate=fp32_gate, aux_loss=aux_loss)
    for name, family in targets:
        module = model.get_submodule(name)
        drop = default_dropout(family) if expert_dropout is None else expert_dropout
        noise, capacity = default_routing(family)
        ffn, templates = _convert(module, family, **kw, expert_dropout=drop, dropout_after_act=family in DROPOUT_AFTER_ACTIVATION,
                                  gate_noise=noise if gate_noise is None else gate_noise,
                                  capacity_factor=capacity if capacity_factor is None else capacity_factor)
        object.__setattr__(ffn, "_dense_templates", {k: _placeholder(v, ffn) for k, v in templates.items()})
        if family == "bert":
            module.intermediate = ffn
            module.output.dense = nn.Identity()  # the EMoE layer already applies the second weight
        elif name:
            _set(model, name, ffn)
        else:
            model = ffn  # the model is itself one FFN block
    return model


def demoefy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`moefy`: every :class:`EMoEFFN` becomes its original dense block (original classes,
    original neuron order, current weights). The result saves and loads as a plain model."""
    layers = emoe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no EMoE layer to turn back into a dense FFN")
    if not inplace:
        model = copy.deepcopy(model)
    for name, ffn in emoe_layers(model):
        if not hasattr(ffn, "_dense_templates"):
            raise ValueError(f"{name}: EMoEFFN built directly, not by moefy(); there is no dense block to restore")
        root = name[: -len(".intermediate")] if ffn.family == "bert" else name
        for rel, module in _restore(ffn).items():
            path = f"{root}.{rel}" if root and rel else root or rel
            if path:
                _set(model, path, module)
            else:
                model = module  # the model was itself one EMoE layer
    return model


to_dense = demoefy
