"""Which parameters a pruning callback prunes, and a report of them by module type and by model role.

A *weight tensor* is a parameter of ``ndim >= 2`` (matrices, kernels), except in a module that lists its own in a
``pruning_weights`` attribute: there only those count. :class:`~zoo.emoe.EMoEFFN` does so (its experts are the
stacked ``fc1_weight``/``up_weight``/``fc2_weight``; its stacked biases are 2-D but no weights). The default
selection of :class:`~callbacks.pruning.MagnitudePruning` is every weight tensor named ``weight`` or listed by its
module, so it reaches Linear/Conv layers and EMoE experts alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from fnmatch import fnmatch

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from zoo.pruning.structured import names_check  # noqa: F401  (one implementation, shared with zoo.pruning)

# roles of zoo.families whose whole absence from a selection is reported (stems, embeddings and norms are often kept on purpose)
CHECKED_ROLES = ("attention", "ffn")


def split_name(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``"a.b.weight"`` -> ``(module.a.b, "weight")``."""
    owner, _, pname = name.rpartition(".")
    return module.get_submodule(owner), pname


def plain_names(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name without pruning's ``_orig`` suffix."""
    return {n.removesuffix("_orig"): p for n, p in module.named_parameters()}


def weight_tensors(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every prunable weight tensor of ``module`` by (plain) name: see the module docstring."""
    out = {}
    for mname, sub in module.named_modules():
        declared = getattr(sub, "pruning_weights", None)
        for pname, p in sub.named_parameters(recurse=False):
            base = pname.removesuffix("_orig")
            if (base in declared) if declared is not None else p.ndim >= 2:
                out[f"{mname}.{base}" if mname else base] = p
    return out


def default_weights(module: nn.Module) -> list[str]:
    """The default selection: weight tensors named ``weight`` or listed by their module's ``pruning_weights``."""
    return [n for n in weight_tensors(module) if n.rpartition(".")[2] == "weight" or getattr(split_name(module, n)[0], "pruning_weights", None)]


def select_parameters(pl_module: nn.Module, patterns: Sequence[str] | None = None, exclude: Sequence[str] = (), include_frozen: bool = False) -> list[str]:
    """Names of the weight tensors matching any of ``patterns`` (fnmatch; None: :func:`default_weights`) and none of
    ``exclude``. Frozen parameters (``requires_grad=False``) are left out unless ``include_frozen``. A pattern that
    matches no parameter raises a ``ValueError`` listing the closest candidates."""
    params = plain_names(pl_module)
    weights = weight_tensors(pl_module)
    for pattern in patterns or ():
        if not any(fnmatch(n, pattern) for n in params):
            close = difflib.get_close_matches(pattern, list(params), n=5, cutoff=0.3) or list(params)[:5]
            raise ValueError(f"pruning pattern {pattern!r} matches no parameter of {type(pl_module).__name__}; candidates: {', '.join(close)}")
    candidates = default_weights(pl_module) if patterns is None else [n for n in weights if any(fnmatch(n, pat) for pat in patterns)]
    chosen = [n for n in candidates if not any(fnmatch(n, ex) for ex in exclude)]
    trainable = [n for n in chosen if include_frozen or weights[n].requires_grad]
    if not trainable:
        shown = "the default selection" if patterns is None else f"pruning patterns {list(patterns)}"
        why = "all of them are frozen (set include_frozen=true to prune them)" if chosen else "none is a weight matrix or kernel outside `exclude`"
        raise ValueError(f"{shown} select no parameter of {type(pl_module).__name__}: {why}")
    return trainable


def by_module_type(pl_module: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{module type: (tensors, parameters)}`` of the named parameters (plain names), largest first."""
    rows: dict[str, list[int]] = {}
    params = plain_names(pl_module)
    for name in names:
        owner = type(split_name(pl_module, name)[0]).__name__
        row = rows.setdefault(owner, [0, 0])
        row[0] += 1
        row[1] += params[name].numel()
    return {k: (v[0], v[1]) for k, v in sorted(rows.items(), key=lambda kv: -kv[1][1])}


def untouched_roles(pl_module: nn.Module, names: Sequence[str], include_frozen: bool = False) -> dict[str, list[str]]:
    """For every model of a known family inside ``pl_module`` (:mod:`zoo.families`), the roles (``attention``,
    ``ffn``, ``block``, ``outside``) that hold trainable weight tensors of which none is in ``names``:
    ``{model name: [roles]}`` (models whose every role is reached are left out)."""
    from zoo.families import find_family, roles, root_of

    chosen = set(names)
    owners: dict[str, list[str]] = {}
    for w, p in weight_tensors(pl_module).items():
        if include_frozen or p.requires_grad:
            owners.setdefault(w.rpartition(".")[0], []).append(w)
    paths = {id(m): n for n, m in pl_module.named_modules()}
    out: dict[str, list[str]] = {}
    seen: list[str] = []
    for name, module in pl_module.named_modules():
        if any(name.startswith(s + ".") for s in seen) or find_family(module) is None:
            continue
        seen.append(name)
        prefix = paths[id(root_of(module))]
        held: dict[str, list[str]] = {}
        for sub, role in roles(module).items():
            full = f"{prefix}.{sub}".strip(".") if sub else prefix
            held.setdefault(role, []).extend(owners.get(full, []))
        missed = [role for role, ws in held.items() if ws and not chosen.intersection(ws)]
        if missed:
            out[name or "<module>"] = sorted(missed)
    return out


def report(who: str, pl_module: nn.Module, names: Sequence[str], include_frozen: bool = False) -> dict[str, list[str]]:
    """Log the table of what ``who`` prunes by module type, and warn about attention / FFN roles of a known model
    family that the selection leaves untouched. Returns :func:`untouched_roles`."""
    table = by_module_type(pl_module, names)
    width = max([len(k) for k in table] + [11])
    lines = [f"{who} prunes {len(names)} tensors ({sum(p for _, p in table.values()):,} parameters):",
             f"  {'module type':<{width}}  tensors  parameters"]
    lines += [f"  {k:<{width}}  {t:>7}  {p:>10,}" for k, (t, p) in table.items()]
    untouched = untouched_roles(pl_module, names, include_frozen)
    lines += [f"  untouched in {model}: {', '.join(roles)}" for model, roles in untouched.items()]
    rank_zero_info("\n".join(lines))
    for model, roles in untouched.items():
        missed = [r for r in roles if r in CHECKED_ROLES]
        if missed:
            rank_zero_warn(f"{who}: the selection leaves every {' and every '.join(missed)} module of {model} unpruned "
                           f"(by module type it prunes: {', '.join(table) or 'nothing'}); widen `patterns` if that is not intended")
    return untouched
