"""EMoE layers: :class:`EMoEFFN` (an FFN split into experts) and the balanced clustering that makes it.

The neurons of a pretrained FFN already specialise (Qiu et al., EMoE): its key vectors (rows of the first
weight, L2-normalised) are clustered into ``num_experts`` equal clusters (balanced k-means, seeded); expert
``e`` holds its neurons' rows of the first weight/bias (and of ``up_proj`` for SwiGLU) and the matching
columns of the second weight; the output bias is shared (each expert holds ``bias / top_k`` in the official
code). The gate is not learned ("avg-k" gating): expert ``e``'s gate vector is the mean of its key vectors,
recomputed from the current weights at every forward. Each token runs only its ``top_k`` experts, within the
experts' capacity (tutel's, :mod:`zoo.emoe.routing`). With ``top_k == num_experts`` the layer equals the dense FFN.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.emoe.routing import CosineRouter, aux_loss, capacity, check_routing, kept

GATES = ("emergent", "learned")
DISPATCH = ("sparse", "masked")


def balanced_clusters(keys: torch.Tensor, num_experts: int, seed: int = 0, n_init: int = 10, max_iter: int = 1000) -> torch.Tensor:
    """Labels ``(H,)`` putting the ``H`` rows of ``keys`` into ``num_experts`` clusters of exactly ``H / num_experts``.

    Balanced k-means (``k_means_constrained.KMeansConstrained``) on the L2-normalised rows (float32, as the
    official ``moe_utils.py``), seeded, so the same weights always give the same clusters. The defaults are the
    official ones (``n_init=10`` restarts, the library's default, and ``max_iter=1000``); ``n_init=1`` is ~10x
    faster and barely worse (MiniLM layer 4, 64 experts: inertia 1356.6 with 1, 1352.4 with 10).
    """
    width = keys.shape[0]
    if num_experts < 1 or width % num_experts:
        raise ValueError(f"num_experts={num_experts} must be >= 1 and divide the FFN width {width}")
    if num_experts == 1:
        return torch.zeros(width, dtype=torch.long)
    from k_means_constrained import KMeansConstrained

    size = width // num_experts
    points = F.normalize(keys.detach().float().cpu(), dim=1).numpy()
    km = KMeansConstrained(n_clusters=num_experts, size_min=size, size_max=size, random_state=seed, n_init=n_init, max_iter=max_iter)
    return torch.from_numpy(np.asarray(km.fit_predict(points), dtype=np.int64))



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
        gate: ``emergent`` (mean keys, not learned, weight 1: the official avg-k / ``one_score`` gate) or ``learned``.
        router: the learned gate's router: ``cosine`` (official EMoE-learn, :class:`~zoo.emoe.routing.CosineRouter`,
            outputs weighted by the chosen experts' probabilities renormalised to sum 1, as tutel) or ``linear``
            (ours: initialised with the mean keys, weights ``top_k * softmax`` over the chosen scores, so a
            uniform router gives weight 1 and the layer starts as the emergent one).
        gate_noise: during training add ``N(0, (gate_noise / num_experts)^2)`` to the logits (as tutel).
        capacity_factor: each expert takes at most ``top_k * int(factor * ceil(T / N))`` of a batch's ``T`` tokens
            (tutel; official 1.5; train and eval); the others' assignments are dropped (see :func:`~zoo.emoe.routing.kept`).
            0: no limit (ours before).
        batch_prioritized: within one choice rank, tokens with the highest routing probability get slots first (official).
        fp32_gate: routing logits computed in float32 with autocast off (official ``fp32_gate=True``).
        expert_dropout: dropout inside the experts (official ``moe_drop``): on the hidden pre-activations,
            ``gelu(dropout(x))`` (BERT, GPT-2), or with ``dropout_after_act`` after the activation, ``dropout(gelu(x))`` (ViT).
        balance_loss: compute the auxiliary load-balance loss in training; read it from ``aux_loss``.
        aux_loss: ``load_importance`` (official: tutel with ``is_gshard_loss=False``), ``gshard`` (tutel's GShard loss,
            first choices) or ``gshard_topk`` (ours before: GShard over all ``top_k`` choices).
        dispatch: ``sparse`` (tokens gathered per expert) or ``masked`` (all experts computed, the
            unchosen ones zeroed: the slow reference).
        labels: cluster label of each neuron; by default from :func:`balanced_clusters` with ``seed``
            and ``cluster_inits`` restarts.
    """

    # the weight tensors of this layer (pruning callbacks select these; the stacked biases are 2-D but not weights)
    pruning_weights = ("fc1_weight", "up_weight", "fc2_weight")

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
        cluster_inits: int = 10,
        labels: torch.Tensor | None = None,
        router: str = "cosine",
        capacity_factor: float = 1.5,
        batch_prioritized: bool = True,
        fp32_gate: bool = True,
        expert_dropout: float = 0.0,
        aux_loss: str = "load_importance",
        dropout_after_act: bool = False,
    ):
        super().__init__()
        width, dim = fc1_weight.shape
        _check_args(num_experts, top_k, gate, dispatch, gate_noise, width, cluster_inits)
        check_routing(router, capacity_factor, aux_loss, expert_dropout)
        if labels is None:
            labels = balanced_clusters(fc1_weight, num_experts, seed, cluster_inits)
        counts = torch.bincount(labels, minlength=num_experts)
        if labels.shape != (width,) or counts.numel() != num_experts or (counts != width // num_experts).any():
            raise ValueError(f"labels must give each of the {num_experts} experts exactly {width // num_experts} neurons, got sizes {counts.tolist()}")
        order = torch.argsort(labels, stable=True).to(fc1_weight.device)
        self.num_experts, self.top_k, self.expert_size = num_experts, top_k, width // num_experts
        self.gate, self.gate_noise, self.balance_loss, self.dispatch = gate, gate_noise, balance_loss, dispatch
        self.capacity_factor, self.batch_prioritized, self.fp32_gate, self.aux_kind = capacity_factor, batch_prioritized, fp32_gate, aux_loss
        self.router_kind = router if gate == "learned" else None
        self.family = "custom"
        self.register_buffer("neuron_order", order)

        def stack(t: torch.Tensor | None) -> nn.Parameter | None:
            if t is None:
                return None
            grad = t.requires_grad  # a frozen dense FFN gives frozen experts
            t = t.detach()[order]
            return nn.Parameter(t.reshape(num_experts, self.expert_size, *t.shape[1:]).clone(), requires_grad=grad)

        self.fc1_weight, self.fc1_bias = stack(fc1_weight), stack(fc1_bias)
        self.up_weight, self.up_bias = stack(up_weight), stack(up_bias)
        self.fc2_weight = stack(fc2_weight.t())
        self.fc2_bias = None if fc2_bias is None else nn.Parameter(fc2_bias.detach().clone(), requires_grad=fc2_bias.requires_grad)
        self.act = act
        self.hidden_dropout = hidden_dropout or nn.Identity()
        self.out_dropout = out_dropout or nn.Identity()
        self.expert_dropout = nn.Dropout(expert_dropout) if expert_dropout > 0 else nn.Identity()
        self.dropout_after_act = bool(dropout_after_act)
        self.router: nn.Parameter | CosineRouter | None = None
        if gate == "learned" and router == "linear":
            self.router = nn.Parameter(self.mean_keys(), requires_grad=self.fc1_weight.requires_grad)
        elif gate == "learned":
            self.router = CosineRouter(dim, num_experts).to(fc1_weight.device).requires_grad_(self.fc1_weight.requires_grad)
        self.aux_loss: torch.Tensor | None = None
        self.routing_counts: torch.Tensor | None = None  # tokens per expert seen in training (not a buffer: DDP would overwrite it)

    def no_weight_decay(self) -> set[str]:
        """The experts' first biases are stacked into (N, m) matrices: still biases (no weight decay)."""
        return {"fc1_bias", "up_bias"}

    def extra_repr(self) -> str:
        n, m, d = self.fc1_weight.shape
        gate = f"{self.gate}/{self.router_kind}" if self.router_kind else self.gate
        return (f"{self.family}, dim={d}, experts={n}x{m}, top_k={self.top_k}, gate={gate}, capacity_factor={self.capacity_factor}, "
                f"dispatch={self.dispatch}, swiglu={self.up_weight is not None}")

    def mean_keys(self) -> torch.Tensor:
        """The emergent gate ``(N, d)``: each expert's mean key vector, from the current weights."""
        return self.fc1_weight.detach().mean(1)

    def gate_weight(self) -> torch.Tensor:
        """The linear gate ``(N, d)``: the mean keys, or the learned linear router (not for the cosine router)."""
        if isinstance(self.router, CosineRouter):
            raise AttributeError("the cosine router has no (N, d) gate weight; call logits(x)")
        return self.router if self.router is not None else self.mean_keys()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Routing logits ``(T, N)`` of tokens ``x (T, d)``, without noise; float32 with autocast off when ``fp32_gate``."""
        if not self.fp32_gate:
            return self.router(x) if isinstance(self.router, CosineRouter) else x @ self.gate_weight().to(x.dtype).t()
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            return self.router(x) if isinstance(self.router, CosineRouter) else x @ self.gate_weight().float().t()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Routing scores ``(T, N)``: the logits plus, in training, noise ``N(0, (gate_noise / N)^2)`` (tutel)."""
        s = self.logits(x)
        if self.training and self.gate_noise > 0:
            s = s + torch.randn_like(s) * (self.gate_noise / self.num_experts)
        return s

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Chosen experts ``(T, k)``, their output weights ``(T, k)`` (None: all 1) and which assignments fit in the
        experts' capacity (bool ``(T, k)``; None: all)."""
        logits = self.logits(x)
        s = logits + torch.randn_like(logits) * (self.gate_noise / self.num_experts) if self.training and self.gate_noise > 0 else logits
        top, idx = s.topk(self.top_k, dim=-1)
        weights = None
        if self.router_kind == "linear":
            weights = self.top_k * top.softmax(-1)
        elif self.router_kind == "cosine":  # tutel's normalize_gate: the chosen probabilities over their sum
            weights = top.softmax(-1)
        keep = kept(s.softmax(-1), idx, capacity(len(x), self.num_experts, self.top_k, self.capacity_factor), self.batch_prioritized)
        if self.training:
            self._count(torch.bincount(idx.reshape(-1), minlength=self.num_experts))
            if self.balance_loss:
                self.aux_loss = aux_loss(self.aux_kind, logits, s, idx, self.gate_noise)
        return idx, weights, keep

    def _count(self, counts: torch.Tensor) -> None:
        counts = counts.detach()
        self.routing_counts = counts.clone() if self.routing_counts is None else self.routing_counts.to(counts.device) + counts

    def _hidden(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, wu: torch.Tensor | None, bu: torch.Tensor | None) -> torch.Tensor:
        h = F.linear(x, w1, b1)
        h = self.expert_dropout(self.act(h)) if self.dropout_after_act else self.act(self.expert_dropout(h))
        if wu is not None:
            h = h * F.linear(x, wu, bu)
        return self.hidden_dropout(h)

    def _flat(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.reshape(-1, *p.shape[2:])

    def _bias(self, x: torch.Tensor, weight_sum: torch.Tensor | None) -> torch.Tensor | None:
        """The output bias per token ``(T, d_out)``: official experts each hold ``bias / top_k`` and their outputs are
        weighted, so a token gets ``bias * (sum of its kept weights) / top_k`` (``bias`` when all ``k`` weights are 1)."""
        if self.fc2_bias is None:
            return None
        b = self.fc2_bias.to(x.dtype).expand(len(x), -1)
        return b if weight_sum is None else b * (weight_sum.to(x.dtype).unsqueeze(-1) / self.top_k)

    def _all_experts(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Every neuron computed; ``mask (T, N)`` scales each expert's hidden units (the masked reference)."""
        h = self._hidden(x, self._flat(self.fc1_weight), self._flat(self.fc1_bias), self._flat(self.up_weight), self._flat(self.up_bias))
        if mask is not None:
            h = (h.view(len(x), self.num_experts, self.expert_size) * mask.unsqueeze(-1).to(h.dtype)).view(len(x), -1)
        y = h @ self._flat(self.fc2_weight)
        b = self._bias(x, None if mask is None else mask.sum(1))
        return y if b is None else y + b

    def _sparse(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Each expert runs on the batch of its kept tokens (``index_select``); results are added back in place (``index_add_``)."""
        flat = idx.reshape(-1)
        slots = torch.argsort(flat, stable=True)
        if keep is not None:
            slots = slots[keep.reshape(-1)[slots]]
            weights = keep.to(x.dtype) if weights is None else weights * keep
        sizes = torch.bincount(flat[slots], minlength=self.num_experts).tolist()
        token_of_slot = slots // self.top_k
        tokens = token_of_slot.split(sizes)
        scale = None if weights is None else weights.reshape(-1)[slots].unsqueeze(-1).to(x.dtype).split(sizes)
        gathered = _GatherByExpert.apply(x, token_of_slot, sizes)
        per_expert = [p.unbind(0) if p is not None else [None] * self.num_experts for p in (self.fc1_weight, self.fc1_bias, self.up_weight, self.up_bias)]
        w2 = self.fc2_weight.unbind(0)
        b = self._bias(x, None if weights is None else weights.sum(1))
        out = x.new_zeros(len(x), w2[0].shape[-1]) if b is None else b.clone()
        for e, size in enumerate(sizes):
            if not size:
                continue
            ye = self._hidden(gathered[e], *(p[e] for p in per_expert)) @ w2[e]
            out.index_add_(0, tokens[e], (ye if scale is None else ye * scale[e]).to(out.dtype))  # autocast: ye may be bf16
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
            idx, weights, keep = self.route(x2)
            if self.dispatch == "sparse":
                y = self._sparse(x2, idx, weights, keep)
            else:
                w = torch.ones_like(idx, dtype=x.dtype) if weights is None else weights.to(x.dtype)
                mask = torch.zeros(len(x2), self.num_experts, device=x.device, dtype=x.dtype)
                mask.scatter_(1, idx, w if keep is None else w * keep)
                y = self._all_experts(x2, mask)
        return self.out_dropout(y).reshape(*lead, -1)

    @torch.no_grad()
    def neuron_norms(self) -> torch.Tensor:
        """``(N, m)``: the L2 norm of each neuron's weights (its rows of ``fc1``, ``up`` and ``fc2``)."""
        total = self.fc1_weight.detach().pow(2).sum(-1) + self.fc2_weight.detach().pow(2).sum(-1)
        if self.up_weight is not None:
            total = total + self.up_weight.detach().pow(2).sum(-1)
        return total.sqrt()

    @torch.no_grad()
    def keep_neurons(self, keep: torch.Tensor) -> None:
        """Keep the neurons ``keep (N, m')`` (indices inside each expert) and drop the others: every expert
        becomes ``m'`` neurons wide (structured pruning). ``neuron_order`` keeps the surviving neurons' order."""
        n, m = self.fc1_weight.shape[:2]
        if keep.ndim != 2 or keep.shape[0] != n or keep.shape[1] < 1 or int(keep.max()) >= m:
            raise ValueError(f"keep must be (num_experts={n}, m') indices below {m}, got shape {tuple(keep.shape)}")
        rows = torch.arange(n, device=keep.device)[:, None]
        for name in ("fc1_weight", "fc1_bias", "up_weight", "up_bias", "fc2_weight"):
            p = getattr(self, name)
            if p is not None:
                setattr(self, name, nn.Parameter(p.detach()[rows, keep].clone(), requires_grad=p.requires_grad))
        order = self.neuron_order.view(n, m)[rows, keep.to(self.neuron_order.device)].reshape(-1)
        self.neuron_order = torch.argsort(torch.argsort(order))  # dense index among the survivors, in the original order
        self.expert_size = keep.shape[1]

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
