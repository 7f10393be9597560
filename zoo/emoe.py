"""EMoE: emergent mixture-of-experts carved out of the dense FFNs of a pretrained model.

Qiu et al., "Emergent Mixture-of-Experts: Can Dense Pre-trained Transformers Benefit from Emergent
Modular Structures?" (paper code: qiuzh20/EMoE). The neurons of a pretrained FFN already specialise:

1. cluster the FFN's key vectors (rows of its first weight, L2-normalised) into ``num_experts``
   clusters of exactly equal size (balanced k-means, ``k-means-constrained``, seeded);
2. expert ``e`` holds its neurons' rows of the first weight/bias (and of ``up_proj`` for SwiGLU)
   and the matching columns of the second weight; the output bias is shared;
3. the gate is not learned ("avg-k" gating): expert ``e``'s gate vector is the mean of its
   (unnormalised) key vectors, recomputed from the current weights at every forward, so it always
   follows the latest optimizer step (on any trainer, under DDP, with gradient accumulation);
4. each token runs only its ``top_k`` experts (highest ``x . gate_e``), summed with weight 1.

With ``top_k == num_experts`` the layer equals the dense FFN (the experts are a permutation of its
neurons), and :func:`demoefy` turns a converted model back into a plain one of its original classes.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GATES = ("emergent", "learned")
DISPATCH = ("sparse", "masked")
FAMILIES = ("timm", "bert", "gpt2", "llama")
SUPPORTED = (
    "timm Mlp (fc1/act/fc2, no inner norm), HF BERT-like layers (intermediate.dense + output.dense), "
    "HF GPT-2-like MLPs (c_fc/c_proj Conv1D), HF Llama-like MLPs (gate_proj/up_proj/down_proj)"
)


def balanced_clusters(keys: torch.Tensor, num_experts: int, seed: int = 0, n_init: int = 1, max_iter: int = 300) -> torch.Tensor:
    """Labels ``(H,)`` putting the ``H`` rows of ``keys`` into ``num_experts`` clusters of exactly ``H / num_experts``.

    Balanced k-means (``k_means_constrained.KMeansConstrained``) on the L2-normalised rows, seeded,
    so the same weights always give the same clusters. ``n_init`` restarts keep the best; one is the
    default because more barely help (MiniLM layer 4, 64 experts: inertia 1356.6 with 1, 1352.4 with 10)
    while each costs a full run (~1.5 s there).
    """
    width = keys.shape[0]
    if num_experts < 1 or width % num_experts:
        raise ValueError(f"num_experts={num_experts} must be >= 1 and divide the FFN width {width}")
    if num_experts == 1:
        return torch.zeros(width, dtype=torch.long)
    from k_means_constrained import KMeansConstrained

    size = width // num_experts
    points = F.normalize(keys.detach().double().cpu(), dim=1).numpy()
    km = KMeansConstrained(n_clusters=num_experts, size_min=size, size_max=size, random_state=seed, n_init=n_init, max_iter=max_iter)
    return torch.from_numpy(np.asarray(km.fit_predict(points), dtype=np.int64))


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


class _GatherByExpert(torch.autograd.Function):
    """``x[index].split(sizes)`` as one small gather per expert, and a backward that adds every chunk's
    gradient into one tensor. (One big gather is slower on CPU: a fresh buffer of ``tokens x top_k`` rows
    costs more in page faults than the copy; autograd's per-chunk gathers would zero a full-size
    gradient per expert.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(index)
        ctx.sizes, ctx.rows = sizes, len(x)
        ctx.set_materialize_grads(False)
        return tuple(x.index_select(0, i) for i in index.split(sizes))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        (index,) = ctx.saved_tensors
        grad = None
        for g, idx in zip(grads, index.split(ctx.sizes)):
            if g is not None:
                grad = g.new_zeros(ctx.rows, g.shape[-1]) if grad is None else grad
                grad.index_add_(0, idx, g)
        return grad, None, None


class EMoEFFN(nn.Module):
    """An FFN split into ``num_experts`` equal experts by clustering its neurons; each token runs ``top_k``.

    Weights are stored stacked by expert: ``fc1_weight (N, m, d)``, ``fc1_bias (N, m)``, optional
    ``up_weight``/``up_bias`` (SwiGLU), ``fc2_weight (N, m, d_out)`` (columns of the dense second
    weight) and the shared ``fc2_bias (d_out,)``. Buffer ``neuron_order (H,)`` holds, expert after
    expert, the dense neuron index of each stored row: it is saved with the weights, so a resumed
    run keeps its clustering and :meth:`dense_weights` can undo the permutation.

    Args:
        fc1_weight, fc1_bias: the first dense weight ``(H, d)`` (Linear layout) and bias (or None).
        fc2_weight, fc2_bias: the second dense weight ``(d_out, H)`` and bias (or None).
        act: the activation module; for SwiGLU it is applied to ``fc1`` and multiplied by ``up``.
        num_experts, top_k: experts per FFN and experts per token.
        up_weight, up_bias: SwiGLU's ``up_proj`` ``(H, d)`` (clustering and gates use ``fc1``, i.e. ``gate_proj``).
        hidden_dropout, out_dropout: dropout after the activation and after the second weight.
        gate: ``emergent`` (mean keys, not learned, weight 1) or ``learned`` (a trained linear
            router initialised with the mean keys; outputs weighted by ``top_k * softmax`` over
            the chosen scores, so a uniform router gives weight 1).
        gate_noise: during training add ``N(0, (gate_noise / num_experts)^2)`` to the scores (as tutel).
        balance_loss: compute the GShard load-balance loss in training; read it from ``aux_loss``.
        dispatch: ``sparse`` (tokens gathered per expert) or ``masked`` (all experts computed, the
            unchosen ones zeroed: the slow reference).
        labels: cluster label of each neuron; by default from :func:`balanced_clusters` with ``seed``
            and ``cluster_inits`` restarts.
    """

    def __init__(
        self,
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor | None,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor | None,
        act: nn.Module,
        num_experts: int,
        top_k: int,
        up_weight: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        hidden_dropout: nn.Module | None = None,
        out_dropout: nn.Module | None = None,
        gate: str = "emergent",
        gate_noise: float = 0.0,
        balance_loss: bool = False,
        dispatch: str = "sparse",
        seed: int = 0,
        cluster_inits: int = 1,
        labels: torch.Tensor | None = None,
    ):
        super().__init__()
        width, dim = fc1_weight.shape
        _check_args(num_experts, top_k, gate, dispatch, gate_noise, width, cluster_inits)
        if labels is None:
            labels = balanced_clusters(fc1_weight, num_experts, seed, cluster_inits)
        counts = torch.bincount(labels, minlength=num_experts)
        if labels.shape != (width,) or counts.numel() != num_experts or (counts != width // num_experts).any():
            raise ValueError(f"labels must give each of the {num_experts} experts exactly {width // num_experts} neurons, got sizes {counts.tolist()}")
        order = torch.argsort(labels, stable=True).to(fc1_weight.device)
        self.num_experts, self.top_k, self.expert_size = num_experts, top_k, width // num_experts
        self.gate, self.gate_noise, self.balance_loss, self.dispatch = gate, gate_noise, balance_loss, dispatch
        self.family = "custom"
        self.register_buffer("neuron_order", order)

        def stack(t: torch.Tensor | None) -> nn.Parameter | None:
            if t is None:
                return None
            t = t.detach()[order]
            return nn.Parameter(t.reshape(num_experts, self.expert_size, *t.shape[1:]).clone(), requires_grad=True)

        self.fc1_weight, self.fc1_bias = stack(fc1_weight), stack(fc1_bias)
        self.up_weight, self.up_bias = stack(up_weight), stack(up_bias)
        self.fc2_weight = stack(fc2_weight.t())
        self.fc2_bias = None if fc2_bias is None else nn.Parameter(fc2_bias.detach().clone())
        self.act = act
        self.hidden_dropout = hidden_dropout or nn.Identity()
        self.out_dropout = out_dropout or nn.Identity()
        self.router = nn.Parameter(self.mean_keys()) if gate == "learned" else None
        self.aux_loss: torch.Tensor | None = None
        self.routing_counts: torch.Tensor | None = None  # tokens per expert seen in training (not a buffer: DDP would overwrite it)

    def extra_repr(self) -> str:
        n, m, d = self.fc1_weight.shape
        return f"{self.family}, dim={d}, experts={n}x{m}, top_k={self.top_k}, gate={self.gate}, dispatch={self.dispatch}, swiglu={self.up_weight is not None}"

    def mean_keys(self) -> torch.Tensor:
        """The emergent gate ``(N, d)``: each expert's mean key vector, from the current weights."""
        return self.fc1_weight.detach().mean(1)

    def gate_weight(self) -> torch.Tensor:
        return self.router if self.router is not None else self.mean_keys()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Routing scores ``(T, N)`` of tokens ``x (T, d)`` (noise added in training when ``gate_noise > 0``)."""
        s = x @ self.gate_weight().to(x.dtype).t()
        if self.training and self.gate_noise > 0:
            s = s + torch.randn_like(s) * (self.gate_noise / self.num_experts)
        return s

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chosen experts ``(T, k)`` and their output weights ``(T, k)`` (None: all weights are 1)."""
        s = self.scores(x)
        top, idx = s.topk(self.top_k, dim=-1)
        weights = self.top_k * top.softmax(-1) if self.router is not None else None
        if self.training:
            counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
            self._count(counts)
            if self.balance_loss:
                share = counts.to(s.dtype) / idx.numel()
                self.aux_loss = self.num_experts * (share * s.float().softmax(-1).mean(0).to(s.dtype)).sum()
        return idx, weights

    def _count(self, counts: torch.Tensor) -> None:
        counts = counts.detach()
        self.routing_counts = counts.clone() if self.routing_counts is None else self.routing_counts.to(counts.device) + counts

    def _hidden(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, wu: torch.Tensor | None, bu: torch.Tensor | None) -> torch.Tensor:
        h = self.act(F.linear(x, w1, b1))
        if wu is not None:
            h = h * F.linear(x, wu, bu)
        return self.hidden_dropout(h)

    def _flat(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.reshape(-1, *p.shape[2:])

    def _all_experts(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Every neuron computed; ``mask (T, N)`` scales each expert's hidden units (the masked reference)."""
        h = self._hidden(x, self._flat(self.fc1_weight), self._flat(self.fc1_bias), self._flat(self.up_weight), self._flat(self.up_bias))
        if mask is not None:
            h = (h.view(len(x), self.num_experts, self.expert_size) * mask.unsqueeze(-1).to(h.dtype)).view(len(x), -1)
        y = h @ self._flat(self.fc2_weight)
        return y if self.fc2_bias is None else y + self.fc2_bias

    def _sparse(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Each expert runs on the batch of its tokens (``index_select``); results are added back in place (``index_add_``)."""
        flat = idx.reshape(-1)
        slots = torch.argsort(flat, stable=True)
        sizes = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of_slot = slots // self.top_k
        tokens = token_of_slot.split(sizes)
        scale = None if weights is None else weights.reshape(-1)[slots].unsqueeze(-1).to(x.dtype).split(sizes)
        gathered = _GatherByExpert.apply(x, token_of_slot, sizes)
        per_expert = [p.unbind(0) if p is not None else [None] * self.num_experts for p in (self.fc1_weight, self.fc1_bias, self.up_weight, self.up_bias)]
        w2 = self.fc2_weight.unbind(0)
        out = x.new_zeros(len(x), w2[0].shape[-1]) if self.fc2_bias is None else self.fc2_bias.to(x.dtype).expand(len(x), -1).clone()
        for e, size in enumerate(sizes):
            if not size:
                continue
            ye = self._hidden(gathered[e], *(p[e] for p in per_expert)) @ w2[e]
            out.index_add_(0, tokens[e], ye if scale is None else ye * scale[e])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        self.aux_loss = None
        if self.top_k == self.num_experts and self.router is None and not (self.training and self.balance_loss):
            # every expert chosen with weight 1: the dense FFN, no routing needed
            if self.training:
                self._count(torch.full((self.num_experts,), len(x2), device=x.device, dtype=torch.long))
            y = self._all_experts(x2, None)
        else:
            idx, weights = self.route(x2)
            if self.dispatch == "sparse":
                y = self._sparse(x2, idx, weights)
            else:
                mask = torch.zeros(len(x2), self.num_experts, device=x.device, dtype=x.dtype)
                mask.scatter_(1, idx, 1.0 if weights is None else weights.to(x.dtype))
                y = self._all_experts(x2, mask)
        return self.out_dropout(y).reshape(*lead, -1)

    @torch.no_grad()
    def dense_weights(self) -> dict[str, torch.Tensor | None]:
        """The dense FFN's weights in their original neuron order (Linear layouts)."""
        inverse = torch.argsort(self.neuron_order)

        def unstack(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else self._flat(p)[inverse].clone()

        fc2 = unstack(self.fc2_weight)
        return {
            "fc1_weight": unstack(self.fc1_weight), "fc1_bias": unstack(self.fc1_bias),
            "up_weight": unstack(self.up_weight), "up_bias": unstack(self.up_bias),
            "fc2_weight": fc2.t().contiguous(), "fc2_bias": None if self.fc2_bias is None else self.fc2_bias.detach().clone(),
        }


def _check_args(num_experts: int, top_k: int, gate: str, dispatch: str, gate_noise: float, width: int | None = None, cluster_inits: int = 1) -> None:
    if not isinstance(cluster_inits, int) or cluster_inits < 1:
        raise ValueError(f"cluster_inits={cluster_inits!r}: expected an integer >= 1")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: expected an integer >= 1")
    if width is not None and width % num_experts:
        divisors = [n for n in range(2, min(width, 128) + 1) if width % n == 0]
        raise ValueError(f"num_experts={num_experts} does not divide the FFN width {width}; valid choices include {divisors}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r}: expected an integer in [1, num_experts={num_experts}]")
    if gate not in GATES:
        raise ValueError(f"gate={gate!r}: expected one of {GATES}")
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch={dispatch!r}: expected one of {DISPATCH}")
    if gate_noise < 0:
        raise ValueError(f"gate_noise={gate_noise}: expected >= 0")


# --- the supported dense FFN blocks ------------------------------------------------------------


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
    """Fill the dense templates with the experts' weights (original order); returns ``{rel path: module}``."""
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
        module = model.get_submodule(name)
        first = {"bert": "intermediate.dense", "gpt2": "c_fc", "llama": "gate_proj", "timm": "fc1"}[family]
        width = module.get_submodule(first).weight.shape[1 if family == "gpt2" else 0]
        _check_args(num_experts, top_k, gate, dispatch, gate_noise, width)
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
