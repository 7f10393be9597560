"""The distillation loss terms: logits (KD, DKD), features (FitNets hints), hidden states and attention maps.

Each is a :class:`~zoo.losses.LossTerm` with its teacher(s) (see :mod:`zoo.distillation.teachers`), so it can be
summed with any other term by any zoo module. A term computes :meth:`DistillLoss.compute` for one teacher;
:meth:`DistillLoss.distill` averages it over the term's teachers.

Mixed precision (``bf16-mixed``): student and teacher run under autocast (bf16 logits, hidden states, attention maps),
and every term computes and returns its value in full precision: the logit terms (KD, DKD, hard distillation) in
float64, the feature, hidden-state and attention terms in float32 (:func:`~zoo.losses.full_precision` of the bf16
values). The reference keeps them at least float32 too: DeiT's / SN-Net's KD runs under ``torch.cuda.amp.autocast``,
where ``log_softmax``, ``kl_div`` and ``cross_entropy`` are float32 ops (SN-Net ``losses.py``, ``engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.losses import CrossEntropy, LossTerm, Step, full_precision

if TYPE_CHECKING:
    from zoo.classifier import Classifier

TeacherSpec = int | str | dict[str, Any] | None


@dataclass
class ModelOutputs:
    """What one forward pass of a student or teacher exposes to the losses."""

    logits: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # by layer name (FeatureHint)
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer index, 0 = embeddings
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # by layer index, (B, heads, N, N)


@dataclass
class Request:
    """What a loss needs from one side (student or teacher)."""

    layers: list[str] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)
    attentions: list[int] = field(default_factory=list)

    def merge(self, other: Request) -> Request:
        return Request(self.layers + [n for n in other.layers if n not in self.layers], sorted(set(self.hidden) | set(other.hidden)),
                       sorted(set(self.attentions) | set(other.attentions)))

    def __bool__(self) -> bool:
        return bool(self.layers or self.hidden or self.attentions)


_f = full_precision  # feature losses are computed in at least float32 (half-precision inputs are upcast)


def _f64(x: torch.Tensor) -> torch.Tensor:
    """Logit losses run (and return) in float64: (batch, classes) is tiny, and T^2 magnifies float32 rounding."""
    return x.double()


class DistillLoss(LossTerm):
    """Base of the distillation terms: ``weight * loss`` is added to the total, logged as ``train/<name>``.

    Args:
        weight: multiplies the term in the total loss.
        teacher: who to learn from. An index into the module's own teachers (``DistillationModule(teachers=[...])``);
            ``None``: the average over all of them; a zoo ``.ckpt``, a model name, or ``{model, model_kwargs,
            pretrained, untrained_head}``: a teacher of the term's own; a name the module provides (SN-Net's
            ``largest``). Terms that name the same teacher share one loaded model, run once per step.
        name: the logged name (default: the class name in snake case).

    Subclasses implement :meth:`compute` for one teacher, say what they need with :meth:`request` and the class
    attribute ``uses_logits``, and create learned parts (projectors) in :meth:`build` from example outputs; a
    checkpoint's projectors are re-created from their saved shapes by :meth:`restore` when it is loaded.
    """

    uses_logits = False  # needs the teacher's logits (a teacher with a classification head)
    cacheable = True  # can run on cached teacher outputs
    needs_example = False  # build() needs example outputs of student and teacher

    def __init__(self, weight: float = 1.0, teacher: TeacherSpec = None, name: str | None = None):
        super().__init__(weight=weight, name=name)
        if isinstance(teacher, bool) or (isinstance(teacher, int) and teacher < 0):
            raise ValueError(f"{type(self).__name__}: teacher={teacher!r} must be a teacher index >= 0, a .ckpt / model name, or null (all teachers)")
        self.teacher = teacher
        self.built = False
        self.register_load_state_dict_pre_hook(_restore_before_load)

    def request(self, side: str) -> Request:
        """Layers, hidden states and attention maps this loss needs from ``side`` (``student``/``teacher``)."""
        return Request()

    def build(self, student: ModelOutputs, teacher: ModelOutputs) -> None:
        """Create learned parts (projectors) from example outputs; raise if the shapes cannot be mapped."""

    def restore(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Create learned parts with the shapes found in a ``state_dict`` under ``prefix`` (before it is loaded)."""

    def compute(self, student: ModelOutputs, teacher: ModelOutputs, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distill(self, student: ModelOutputs, teachers: list[ModelOutputs], targets: torch.Tensor) -> torch.Tensor:
        """The term averaged over ``teachers``."""
        return torch.stack([self.compute(student, t, targets) for t in teachers]).mean()

    # -- as a loss term of a zoo module ----------------------------------------------------------------------------
    def setup(self, module: Classifier, stage: str) -> None:
        """Resolve the teachers (loading them once per module), check them, register the taps, build projectors."""
        if stage == "fit":
            from zoo.distillation.teachers import pool_of

            pool_of(module).attach(self, module, example=not self.built and self.needs_example)

    def forward(self, step: Step) -> torch.Tensor:
        from zoo.distillation.teachers import pool_of

        pool = pool_of(step.module)
        keys = pool.attach(self, step.module)
        return self.distill(pool.student_outputs(step), [pool.teacher_outputs(step, k) for k in keys], step.targets)


def _restore_before_load(term: DistillLoss, state_dict: dict, prefix: str, *args: Any) -> None:
    term.restore(state_dict, prefix)


HardCE = CrossEntropy  # the distillation preset's old name of the label term (existing YAML keeps working)


class SoftTargetKL(DistillLoss):
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al., 2015).

    ``reduction: batchmean`` (default) averages the KL over the batch; ``numel`` divides the summed KL by
    ``batch * classes`` as DeiT and the official SN-Net code do (``kl_div(..., reduction='sum') * T*T / s.numel()``),
    i.e. ``classes`` times weaker.
    """

    uses_logits = True
    REDUCTIONS = ("batchmean", "numel")

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, teacher: TeacherSpec = None, name: str | None = None,
                 reduction: str = "batchmean"):
        super().__init__(weight=weight, teacher=teacher, name=name)
        if temperature <= 0:
            raise ValueError(f"SoftTargetKL: temperature={temperature} must be > 0")
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"SoftTargetKL: reduction={reduction!r}: expected one of {self.REDUCTIONS}")
        self.temperature, self.reduction = float(temperature), reduction

    def compute(self, student, teacher, targets):
        t = self.temperature
        log_p_s = F.log_softmax(_f64(student.logits) / t, -1)
        log_p_t = F.log_softmax(_f64(teacher.logits) / t, -1)
        if self.reduction == "numel":
            return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * t * t / student.logits.numel()
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


class HardDistill(DistillLoss):
    """DeiT's hard distillation (Touvron et al., 2021): cross-entropy of the student on the teacher's argmax."""

    uses_logits = True

    def compute(self, student, teacher, targets):
        return F.cross_entropy(_f64(student.logits), teacher.logits.argmax(-1))


class DecoupledKD(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): ``(alpha * TCKD + beta * NCKD) * T^2``.

    TCKD is the KL between the binary (target, rest) probabilities of teacher and student; NCKD the KL between
    their distributions over the non-target classes only. Both are averaged over the batch.

    ``warmup`` (official mdistiller DKD, 20 epochs in its configs): the term is scaled by ``min(epoch / warmup, 1)``
    with mdistiller's 1-based epoch, i.e. ``(current_epoch + 1) / warmup`` in Lightning's 0-based count; 0 = off.
    """

    uses_logits = True

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, teacher: TeacherSpec = None,
                 name: str | None = None, warmup: int = 20):
        super().__init__(weight=weight, teacher=teacher, name=name)
        if temperature <= 0 or alpha < 0 or beta < 0:
            raise ValueError(f"DecoupledKD: temperature={temperature} must be > 0, alpha={alpha} and beta={beta} >= 0")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"DecoupledKD: warmup={warmup!r}: expected a number of epochs >= 0 (0 = no warm-up)")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), warmup

    def warmup_scale(self, current_epoch: int) -> float:
        """``min(epoch / warmup, 1)`` with the official 1-based epoch (Lightning's ``current_epoch + 1``)."""
        return 1.0 if not self.warmup else min((current_epoch + 1) / self.warmup, 1.0)

    def forward(self, step: Step) -> torch.Tensor:
        return super().forward(step) * self.warmup_scale(step.module.current_epoch)

    @staticmethod
    def _parts(logits: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of (target, rest), and log-softmax over the non-target classes (target -> -inf)."""
        log_all = torch.logsumexp(logits, -1, keepdim=True)
        non_target = logits.masked_fill(target_mask, float("-inf"))
        log_rest = torch.logsumexp(non_target, -1, keepdim=True)
        log_target = (logits * target_mask).sum(-1, keepdim=True)
        binary = torch.cat([log_target, log_rest], -1) - log_all
        return binary, non_target - log_rest

    def compute(self, student, teacher, targets):
        t = self.temperature
        mask = F.one_hot(targets, student.logits.shape[-1]).bool()
        bin_s, nt_s = self._parts(_f64(student.logits) / t, mask)
        bin_t, nt_t = self._parts(_f64(teacher.logits) / t, mask)
        tckd = F.kl_div(bin_s, bin_t, log_target=True, reduction="batchmean")
        p_t = nt_t.exp()  # exactly 0 at the target class
        nckd = (p_t * (nt_t - nt_s).masked_fill(mask, 0.0)).sum(-1).mean()
        return (self.alpha * tckd + self.beta * nckd) * t * t


def make_projector(student: torch.Tensor, teacher: torch.Tensor, what: str) -> nn.Module | None:
    """``None`` when shapes match; a Linear on the width of ``(B, C)``/``(B, N, C)`` features; a 1x1 conv on
    ``(B, C, H, W)`` maps. Anything else (token counts, spatial sizes or ranks that differ) is refused."""
    s, t = tuple(student.shape[1:]), tuple(teacher.shape[1:])
    if s == t:
        return None
    rank_ok = student.dim() == teacher.dim() and student.dim() in (2, 3, 4)
    if rank_ok and student.dim() == 2:
        return nn.Linear(s[0], t[0])
    if rank_ok and student.dim() == 3 and s[0] == t[0]:
        return nn.Linear(s[1], t[1])
    if rank_ok and student.dim() == 4 and s[1:] == t[1:]:
        return nn.Conv2d(s[0], t[0], 1)
    raise ValueError(
        f"{what}: student features of shape {s} cannot be mapped onto teacher features of shape {t} (batch dim "
        f"left out). A projector maps widths only: Linear for (C,) vectors and (tokens, C) sequences with the same "
        f"number of tokens, 1x1 conv for (C, H, W) maps with the same H, W. Pick layers of matching resolution."
    )


def projector_like(weight: torch.Tensor) -> nn.Module:
    """A projector with the shape of a saved ``weight`` (Linear: 2-D, 1x1 conv: 4-D)."""
    if weight.dim() == 2:
        return nn.Linear(weight.shape[1], weight.shape[0])
    return nn.Conv2d(weight.shape[1], weight.shape[0], 1)


class FeatureHint(DistillLoss):
    """FitNets hints (Romero et al., ICLR 2015): ``MSE(projector(student[layer]), teacher[layer])``.

    Layer names are those of ``named_modules()`` of the student's ``backbone`` and of the teacher's ``backbone``
    (or of the teacher itself when it has none); outputs are taken with forward hooks. The projector is learned
    with the student and exists only when the shapes differ (Linear for vectors/tokens, 1x1 conv for maps).
    """

    needs_example = True

    def __init__(self, student_layer: str, teacher_layer: str, weight: float = 1.0, teacher: TeacherSpec = 0, name: str | None = None):
        super().__init__(weight=weight, teacher=teacher, name=name)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.projector: nn.Module | None = None

    def request(self, side):
        return Request(layers=[self.student_layer if side == "student" else self.teacher_layer])

    def build(self, student, teacher):
        what = f"FeatureHint({self.student_layer!r} -> {self.teacher_layer!r})"
        self.projector = make_projector(student.features[self.student_layer], teacher.features[self.teacher_layer], what)
        self.built = True

    def restore(self, state_dict, prefix):
        weight = state_dict.get(prefix + "projector.weight")
        if self.projector is None and weight is not None:
            self.projector = projector_like(weight)
            self.built = True

    def compute(self, student, teacher, targets):
        s = student.features[self.student_layer]
        s = self.projector(s) if self.projector is not None else s
        return F.mse_loss(_f(s), _f(teacher.features[self.teacher_layer]))


def _check_pairs(name: str, layer_pairs: list) -> list[tuple[int, int]]:
    pairs = [tuple(int(i) for i in p) for p in layer_pairs]
    if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(f"{name}: layer_pairs={layer_pairs!r} must be a non-empty list of [student_layer, teacher_layer] indices >= 0")
    return pairs  # type: ignore[return-value]


class HiddenStateDistill(DistillLoss):
    """TinyBERT's hidden-state loss: mean over ``layer_pairs`` of ``MSE(W h_s[i], h_t[j])``.

    Index 0 is the embedding output, ``i`` the output of layer ``i`` (Hugging Face's ``hidden_states``
    convention). ``W`` is a learned Linear per pair when widths differ; token counts must match (same tokenizer
    or patch grid). Padding positions are included, as in TinyBERT.
    """

    cacheable = False
    needs_example = True

    def __init__(self, layer_pairs: list[tuple[int, int]], weight: float = 1.0, teacher: TeacherSpec = 0, name: str | None = None):
        super().__init__(weight=weight, teacher=teacher, name=name)
        self.layer_pairs = _check_pairs("HiddenStateDistill", layer_pairs)
        self.projectors = nn.ModuleDict()

    def request(self, side):
        return Request(hidden=sorted({p[0] if side == "student" else p[1] for p in self.layer_pairs}))

    def build(self, student, teacher):
        for i, j in self.layer_pairs:
            proj = make_projector(student.hidden_states[i], teacher.hidden_states[j], f"HiddenStateDistill(student {i} -> teacher {j})")
            if proj is not None:
                self.projectors[f"{i}_{j}"] = proj
        self.built = True

    def restore(self, state_dict, prefix):
        for key, value in state_dict.items():
            name = key[len(prefix + "projectors."):].split(".")[0]
            if key.startswith(prefix + "projectors.") and key.endswith(".weight") and name not in self.projectors:
                self.projectors[name] = projector_like(value)
                self.built = True

    def compute(self, student, teacher, targets):
        losses = []
        for i, j in self.layer_pairs:
            s = student.hidden_states[i]
            proj = self.projectors[f"{i}_{j}"] if f"{i}_{j}" in self.projectors else None
            losses.append(F.mse_loss(_f(proj(s) if proj is not None else s), _f(teacher.hidden_states[j])))
        return torch.stack(losses).mean()


class AttentionDistill(DistillLoss):
    """Attention-map distillation between ``layer_pairs`` (0-based layer indices), averaged over pairs.

    ``mode: kl`` is MiniLM's KL(A_t || A_s) over the keys, averaged over batch, heads and queries; ``mode: mse``
    TinyBERT's MSE between attention maps (of probabilities here). When head counts differ, both maps are
    averaged over heads first. Sequence lengths must match.
    """

    cacheable = False
    needs_example = True

    def __init__(self, layer_pairs: list[tuple[int, int]], weight: float = 1.0, mode: str = "kl", teacher: TeacherSpec = 0, name: str | None = None):
        super().__init__(weight=weight, teacher=teacher, name=name)
        if mode not in ("kl", "mse"):
            raise ValueError(f"AttentionDistill: mode={mode!r}: expected 'kl' or 'mse'")
        self.layer_pairs = _check_pairs("AttentionDistill", layer_pairs)
        self.mode = mode

    def request(self, side):
        return Request(attentions=sorted({p[0] if side == "student" else p[1] for p in self.layer_pairs}))

    def build(self, student, teacher):
        for i, j in self.layer_pairs:
            s, t = student.attentions[i].shape, teacher.attentions[j].shape
            if s[-2:] != t[-2:]:
                raise ValueError(f"AttentionDistill(student {i} -> teacher {j}): attention maps {tuple(s[1:])} and {tuple(t[1:])} have different "
                                 "sequence lengths; student and teacher need the same tokenizer / patch grid")
        self.built = True

    def compute(self, student, teacher, targets):
        losses = []
        for i, j in self.layer_pairs:
            a_s, a_t = _f(student.attentions[i]), _f(teacher.attentions[j])
            if a_s.shape[1] != a_t.shape[1]:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            if self.mode == "mse":
                losses.append(F.mse_loss(a_s, a_t))
            else:
                kl = torch.xlogy(a_t, a_t) - a_t * a_s.clamp_min(1e-12).log()
                losses.append(kl.sum(-1).mean())
        return torch.stack(losses).mean()
