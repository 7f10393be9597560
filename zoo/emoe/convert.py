"""moefy / demoefy: turn the dense FFNs of a model into :class:`~zoo.emoe.layers.EMoEFFN` layers, and back.

Supported FFNs: timm ``Mlp`` (ViT, DeiT...), HF BERT-like layers (``intermediate.dense`` +
``output.dense``; the output's dropout, residual and LayerNorm are kept), HF GPT-2-like MLPs
(``c_fc``/``c_proj`` ``Conv1D``) and HF Llama-like SwiGLU MLPs (``gate_proj``/``up_proj``/``down_proj``).

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

from zoo.emoe.layers import EMoEFFN, _check_args

FAMILIES = ("timm", "bert", "gpt2", "llama")
SUPPORTED = (
    "timm Mlp (fc1/act/fc2, no inner norm), HF BERT-like layers (intermediate.dense + output.dense), "
    "HF GPT-2-like MLPs (c_fc/c_proj Conv1D), HF Llama-like MLPs (gate_proj/up_proj/down_proj)"
)
# the first dense weight of each FFN kind (its rows are the neurons)
FIRST = {"bert": "intermediate.dense", "gpt2": "c_fc", "llama": "gate_proj", "timm": "fc1"}


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


def ffn_family(module: nn.Module) -> str | None:
    """``timm``/``bert``/``gpt2``/``llama`` when ``module`` is a supported FFN block, else None."""
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and hasattr(module, "act_fn"):
        return "llama"
    if _is_conv1d(getattr(module, "c_fc", None)) and _is_conv1d(getattr(module, "c_proj", None)) and hasattr(module, "act"):
        return "gpt2"
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if isinstance(getattr(inter, "dense", None), nn.Linear) and hasattr(inter, "intermediate_act_fn") and isinstance(getattr(out, "dense", None), nn.Linear):
        return "bert"
    try:
        from timm.layers import Mlp
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(module, Mlp) and isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear):
        return "timm"
    return None


def _timm_norm_ok(module: nn.Module) -> bool:
    return isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)


def _convert(module: nn.Module, family: str, **kw) -> tuple[EMoEFFN, dict[str, nn.Module]]:
    """Build the EMoE layer of a dense block, and the emptied dense modules to restore it later."""
    if family == "timm":
        ffn = EMoEFFN(module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias, module.act,
                      hidden_dropout=module.drop1, out_dropout=module.drop2, **kw)
        templates = {"": module}
    elif family == "bert":
        inter, dense_out = module.intermediate, module.output.dense
        ffn = EMoEFFN(inter.dense.weight, inter.dense.bias, dense_out.weight, dense_out.bias, inter.intermediate_act_fn, **kw)
        templates = {"intermediate": inter, "output.dense": dense_out}
    elif family == "gpt2":
        ffn = EMoEFFN(module.c_fc.weight.t(), module.c_fc.bias, module.c_proj.weight.t(), module.c_proj.bias, module.act,
                      out_dropout=module.dropout, **kw)
        templates = {"": module}
    else:
        ffn = EMoEFFN(module.gate_proj.weight, module.gate_proj.bias, module.down_proj.weight, module.down_proj.bias, module.act_fn,
                      up_weight=module.up_proj.weight, up_bias=module.up_proj.bias, **kw)
        templates = {"": module}
    ffn.family = family
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


def _fill(ffn: EMoEFFN) -> dict[str, nn.Module]:
    w, t, like = ffn.dense_weights(), ffn._dense_templates, ffn.fc1_weight
    if ffn.family == "timm":
        m = t[""]
        m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias = (_param(w[k], like) for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
        return {"": m}
    if ffn.family == "bert":
        inter, dense_out = t["intermediate"], t["output.dense"]
        inter.dense.weight, inter.dense.bias = _param(w["fc1_weight"], like), _param(w["fc1_bias"], like)
        dense_out.weight, dense_out.bias = _param(w["fc2_weight"], like), _param(w["fc2_bias"], like)
        return {"intermediate": inter, "output.dense": dense_out}
    m = t[""]
    if ffn.family == "gpt2":
        m.c_fc.weight, m.c_fc.bias = _param(w["fc1_weight"].t().contiguous(), like), _param(w["fc1_bias"], like)
        m.c_proj.weight, m.c_proj.bias = _param(w["fc2_weight"].t().contiguous(), like), _param(w["fc2_bias"], like)
        return {"": m}
    m.gate_proj.weight, m.gate_proj.bias = _param(w["fc1_weight"], like), _param(w["fc1_bias"], like)
    m.up_proj.weight, m.up_proj.bias = _param(w["up_weight"], like), _param(w["up_bias"], like)
    m.down_proj.weight, m.down_proj.bias = _param(w["fc2_weight"], like), _param(w["fc2_bias"], like)
    return {"": m}


def ffn_width(module: nn.Module, family: str) -> int:
    """Neurons of a supported dense FFN block."""
    return module.get_submodule(FIRST[family]).weight.shape[1 if family == "gpt2" else 0]


def find_ffns(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, family)`` of every supported dense FFN block of ``model``, in model order."""
    found, inside = [], ()
    for name, module in model.named_modules():
        if inside and any(name.startswith(p + ".") for p in inside):
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
    gate_noise: float = 0.0,
    balance_loss: bool = False,
    dispatch: str = "sparse",
    seed: int = 0,
    cluster_inits: int = 1,
) -> nn.Module:
    """Turn the chosen dense FFNs of ``model`` into :class:`EMoEFFN` layers (a copy unless ``inplace``).

    ``layers``: indices into :func:`find_ffns` (model order, negative allowed) or names/fnmatch
    patterns of the FFN blocks (for BERT-like models the layer, e.g. ``model.encoder.layer.4``); None: all.
    Returns the converted model (an :class:`EMoEFFN` when ``model`` is itself one FFN block). All arguments are checked (widths, ``top_k``, names) before any weight is touched.
    """
    _check_args(num_experts, top_k, gate, dispatch, gate_noise, cluster_inits=cluster_inits)
    found = find_ffns(model)
    if not found:
        already = " (it is already converted)" if emoe_layers(model) else ""
        raise ValueError(f"{type(model).__name__} has no supported FFN block{already}. Supported: {SUPPORTED}")
    targets = select_layers(found, layers)
    for name, family in targets:
        _check_args(num_experts, top_k, gate, dispatch, gate_noise, ffn_width(model.get_submodule(name), family))
    if not inplace:
        model = copy.deepcopy(model)
    kw = dict(num_experts=num_experts, top_k=top_k, gate=gate, gate_noise=gate_noise, balance_loss=balance_loss, dispatch=dispatch, seed=seed, cluster_inits=cluster_inits)
    for name, family in targets:
        module = model.get_submodule(name)
        ffn, templates = _convert(module, family, **kw)
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


def paper_defaults(family: str, num_layers: int) -> tuple[int, int, list[int]]:
    """``(num_experts, top_k, layer indices)`` recommended by the paper for a model family.

    BERT/GPT-2-like: the layer at depth 10/12 (index ``L - 2``), 64 experts, top-16.
    ViT (timm): every other block of the last third counted from the last, 24 experts, top-4.
    Llama-like: every second layer of the upper half, 64 experts, top-16 (1/4 of them).
    """
    if family in ("bert", "gpt2"):
        return 64, 16, [max(num_layers - 2, 0)]
    if family == "timm":
        return 24, 4, sorted(range(num_layers - 1, num_layers - 1 - max(num_layers // 3, 1), -2))
    if family == "llama":
        return 64, 16, list(range(num_layers // 2, num_layers, 2))
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
