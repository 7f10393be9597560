"""Teachers: loaded once per module, inert, shared by the terms that name them, run once per step.

A term names its teacher (see :class:`~zoo.distillation.losses.DistillLoss`); the module's :class:`TeacherPool`
(one per module, found with :func:`pool_of`) loads it the first time, keeps it in eval mode with
``requires_grad=False``, and outside the module (so outside its optimizer, checkpoint and DDP) unless a preset
registers it itself (``DistillationModule(save_teachers=true)``). Within a step the outputs of a teacher are
computed once (:attr:`zoo.losses.Step.shared`) with what all of its terms request, or read from its
:class:`~zoo.distillation.cache.TeacherCache`.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.backbones import build_backbone, load_zoo_module
from zoo.batch import as_batch
from zoo.distillation.losses import DistillLoss, ModelOutputs, Request
from zoo.distillation.taps import StudentTaps, Taps
from zoo.losses import Step

TEACHER_KEYS = ("model", "pretrained", "model_kwargs", "untrained_head")


class HeadedBackbone(nn.Module):
    """A backbone with a linear head, for teachers named by model rather than by checkpoint."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Any) -> torch.Tensor:
        features = self.backbone(x)
        return self.head(features) if self.head is not None else features


def load_teacher(spec: str | dict[str, Any], num_classes: int, pretrained: bool = True, model_kwargs: dict | None = None,
                 untrained_head: bool = False) -> tuple[nn.Module, bool]:
    """``(teacher, has_head)``, frozen and in eval mode. ``spec``: a zoo ``.ckpt`` (any zoo module: its forward gives
    the logits), a model name (a backbone: no trained head), or ``{model, pretrained, model_kwargs, untrained_head}``."""
    if isinstance(spec, dict):
        if "model" not in spec or set(spec) - set(TEACHER_KEYS):
            raise ValueError(f"teacher {spec!r}: expected a .ckpt path, a model name, or a dict with keys {TEACHER_KEYS} ('model' required)")
        return load_teacher(spec["model"], num_classes, spec.get("pretrained", pretrained), spec.get("model_kwargs"), spec.get("untrained_head", False))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"teacher {spec!r}: expected a .ckpt path, a model name or a dict with keys {TEACHER_KEYS}")
    if spec.endswith(".ckpt"):
        teacher, has_head = load_zoo_module(spec), True
        n = getattr(teacher, "num_classes", None)
        if n is not None and n != num_classes:
            raise ValueError(f"teacher {spec!r} predicts {n} classes but the student has num_classes={num_classes}; teacher and student must share the label set")
    else:
        backbone = build_backbone(spec, pretrained, **(model_kwargs or {}))
        teacher, has_head = HeadedBackbone(backbone, nn.Linear(backbone.num_features, num_classes) if untrained_head else None), untrained_head
    return teacher.requires_grad_(False).eval(), has_head


def example_inputs(module: nn.Module, who: str) -> Any:
    """Two training inputs from public APIs: the datamodule's deterministic ``eval_view("train")``, else its first
    training batch, else ``module.example_input_array``."""
    try:
        dm = module.trainer.datamodule
    except (RuntimeError, AttributeError):  # not attached to a Trainer
        dm = None
    if dm is not None and callable(getattr(dm, "eval_view", None)):
        view = dm.eval_view("train")
        collate = getattr(dm, "collate_fn", None)
        samples = [view[i] for i in range(min(2, len(view)))]
        return as_batch(collate(samples) if collate else torch.utils.data.default_collate(samples)).inputs
    if dm is not None and callable(getattr(dm, "train_dataloader", None)):
        return as_batch(next(iter(dm.train_dataloader()))).ready().inputs
    if getattr(module, "example_input_array", None) is not None:
        return module.example_input_array
    raise ValueError(f"{who} builds its projectors from example inputs before training: fit with a datamodule, "
                     f"or set {type(module).__name__}.example_input_array")


def _device(x: Any) -> torch.device | None:
    if isinstance(x, torch.Tensor):
        return x.device
    if isinstance(x, dict):
        return next((v.device for v in x.values() if isinstance(v, torch.Tensor)), None)
    return None


@dataclass
class Teacher:
    """One loaded teacher: the model, whether it has a trained head, and what its terms request."""

    model: nn.Module
    has_head: bool
    label: str
    request: Request = field(default_factory=Request)
    taps: Taps | None = None
    cache: Any = None  # a zoo.distillation.cache.TeacherCache

    @property
    def root(self) -> nn.Module:
        return getattr(self.model, "backbone", self.model)

    def run(self, x: Any) -> ModelOutputs:
        """The requested outputs on ``x`` (no gradient; the teacher follows ``x`` to its device)."""
        device, p = _device(x), next(self.model.parameters(), None)
        if device is not None and p is not None and p.device != device:
            self.model.to(device)
        if self.model.training:
            self.model.eval()
        if self.taps is None:
            self.taps = Taps(self.root, f"teacher {self.label}", self.request)
        with torch.no_grad(), self.taps.capture() as out:
            logits = self.model(self.taps.prepare(x))
        out.logits = logits if self.has_head else None
        return out


class TeacherPool:
    """The teachers of one module, by key: an index (a preset's own list), a spec string, or a provided name."""

    def __init__(self):
        self.teachers: dict[Any, Teacher] = {}
        self.aliases: dict[str, Any] = {}
        self.default: list[Any] = []
        self.student: StudentTaps | None = None
        self.attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def add(self, key: Any, model: nn.Module, has_head: bool = True, label: str | None = None, default: bool = False) -> None:
        """Register a teacher under ``key`` (``default``: one of the teachers that ``teacher: null`` averages over)."""
        if key in self.teachers and self.teachers[key].model is model:
            return
        self.teachers[key] = Teacher(model.requires_grad_(False).eval(), has_head, label or str(key))
        if isinstance(label, str):
            self.aliases.setdefault(label, key)
        if default and key not in self.default:
            self.default.append(key)

    def resolve(self, spec: Any, module: nn.Module, who: str) -> list[Any]:
        """The keys of the teachers ``spec`` names, loading a ``.ckpt`` / model name the first time."""
        if spec is None:
            if not self.default:
                raise ValueError(f"{who}: teacher=null means every teacher of the module, and {type(module).__name__} has none; "
                                 f"give the term a teacher: a zoo .ckpt, a model name, or {{model, model_kwargs, pretrained, untrained_head}}")
            return list(self.default)
        if isinstance(spec, int):
            if spec not in self.teachers:
                n = len(self.default)
                raise ValueError(f"{who}: teacher={spec} but {type(module).__name__} has {n} teachers" + (f" (indices 0..{n - 1})" if n else
                                 "; give the term a teacher: a zoo .ckpt, a model name, or {model, model_kwargs, pretrained, untrained_head}"))
            return [spec]
        key = json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else self.aliases.get(spec, spec)
        if key not in self.teachers:
            if spec == "largest":
                raise ValueError(f"{who}: teacher 'largest' is the largest anchor of an SN-Net (zoo.snnet.SNNetModule); "
                                 f"{type(module).__name__} has none. Give a zoo .ckpt or a model name.")
            model, has_head = load_teacher(spec, getattr(module, "num_classes", 0))
            self.add(key, model, has_head, Path(spec).name if isinstance(spec, str) else str(spec.get("model")))
        return [key]

    def attach(self, term: DistillLoss, module: nn.Module, example: bool = False) -> list[Any]:
        """The keys of ``term``'s teachers, checked; its requests registered (student and teachers); with
        ``example``, its projectors built from example outputs."""
        keys = self.attached.get(term)
        if keys is not None and not example:
            return keys
        who = f"loss term {term.name!r} ({type(term).__name__})"
        keys = self.resolve(term.teacher, module, who)
        for k in keys:
            t = self.teachers[k]
            if term.uses_logits and not t.has_head:
                raise ValueError(f"{who} needs teacher logits, but teacher {t.label!r} is named by model and has no trained head. Finetune "
                                 "the teacher first (zoo.Classifier) and give its .ckpt, or use feature/hidden/attention losses only.")
            if term.request("teacher"):
                t.request = t.request.merge(term.request("teacher"))
                t.taps = Taps(t.root, f"teacher {t.label}", t.request)  # checks the names now
        request = term.request("student")
        if request:
            if self.student is None:
                self.student = StudentTaps(module)
            self.student.request = self.student.request.merge(request)
            self.student.taps(module)  # checks the names now
        if example:
            self.build(term, module, keys[0])
        self.attached[term] = keys
        return keys

    def build(self, term: DistillLoss, module: nn.Module, key: Any) -> None:
        """``term.build`` from the outputs of student and teacher on two example inputs."""
        x = example_inputs(module, f"loss term {term.name!r} ({type(term).__name__})")
        was_training = module.training
        module.eval()
        try:
            taps = Taps(module.backbone, "student", term.request("student"))
            with torch.no_grad(), taps.capture() as student:
                student.logits = module(taps.prepare(x))
            teacher = Teacher(self.teachers[key].model, self.teachers[key].has_head, self.teachers[key].label, term.request("teacher")).run(x)
        finally:
            module.train(was_training)
        term.build(student, teacher)

    def student_outputs(self, step: Step) -> ModelOutputs:
        """The student's logits (the step's) and what the terms requested from its forward pass, once per step."""
        if "student" not in step.shared:
            out = ModelOutputs(logits=step.logits)
            if self.student is not None and self.student.request:
                latest, self.student.latest = self.student.latest, None
                if latest is None:
                    raise ValueError(f"distillation terms read {self.student.request} from the student, but {type(step.module).__name__} "
                                     "computed its logits without calling itself on the inputs (module(inputs)), so nothing was captured; "
                                     "use logit terms (SoftTargetKL, DecoupledKD) with this module")
                out.features, out.hidden_states, out.attentions = latest.features, latest.hidden_states, latest.attentions
            step.shared["student"] = out
        return step.shared["student"]

    def teacher_outputs(self, step: Step, key: Any) -> ModelOutputs:
        """Teacher ``key``'s outputs for the step's batch: computed (or read from its cache) once per step."""
        name = ("teacher", key)
        if name not in step.shared:
            t = self.teachers[key]
            if t.cache is not None:
                index = step.batch.require("index", by=f"the teacher cache (cache_teacher: true) of teacher {t.label!r}")
                step.shared[name] = t.cache.outputs(index, step.logits.device)
            else:
                step.shared[name] = t.run(step.batch.inputs)
        return step.shared[name]


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pool_of(module: nn.Module) -> TeacherPool:
    """The :class:`TeacherPool` of ``module`` (created empty the first time)."""
    pool = _POOLS.get(module)
    if pool is None:
        pool = _POOLS[module] = TeacherPool()
    return pool
