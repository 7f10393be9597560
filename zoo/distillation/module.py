"""DistillationModule: a preset of :class:`~zoo.classifier.Classifier` for a student and its list of teachers."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from zoo import sharding
from zoo import losses as L
from zoo.classifier import Classifier
from zoo.distillation.cache import build_cache
from zoo.distillation.losses import DistillLoss, HardCE, SoftTargetKL
from zoo.distillation.teachers import load_teacher, pool_of


class DistillationModule(Classifier):
    """A student :class:`~zoo.classifier.Classifier` trained on a weighted sum of loss terms from its teachers.

    The same as ``zoo.Classifier(losses=[...])`` with the terms' teachers listed once here: a term's
    ``teacher: k`` is ``teachers[k]``, ``teacher: null`` averages over all of them.

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
            Training batches must carry indices: set ``with_index: true`` on the datamodule.
        approximate_cache_targets: allow the cache with a random training transform (teacher outputs are then
            computed on the datamodule's deterministic view of its training split).
        cache_dir: where the cache lives (default ``zoo.runtime.cache_dir("teacher_cache")``: ``$ZOO_CACHE_DIR``,
            else ``~/.cache/lightning-zoo``); a cache with the same teachers, layers and data is reused by later runs.
        optimizer, lr_scheduler, scheduler_interval: as :class:`~zoo.classifier.Classifier`.
        label_smoothing: of the validation loss (training: ``HardCE``'s / ``CrossEntropy``'s own).
    """

    def __init__(
        self,
        model: str = "zoo/convnet",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        teachers: list[str] | None = None,
        losses: list[L.LossTerm] | None = None,
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
        terms = [L.instantiate(t) for t in losses] if losses is not None else [SoftTargetKL(weight=0.9), HardCE(weight=0.1)]
        super().__init__(model=model, num_classes=num_classes, pretrained=pretrained, model_kwargs=model_kwargs, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, scheduler_interval=scheduler_interval, label_smoothing=0.0, losses=terms)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # the validation loss
        self.save_teachers, self.cache_teacher = save_teachers, cache_teacher
        self.approximate_cache_targets, self.cache_dir = approximate_cache_targets, cache_dir
        specs = list(teachers or [])
        loaded = [load_teacher(t, num_classes, teacher_pretrained, teacher_model_kwargs, untrained_teacher_head) for t in specs]
        self.teachers = nn.ModuleList(m for m, _ in loaded)
        self.has_head = [h for _, h in loaded]
        # Teachers get no gradient and never change: DDP neither broadcasts their buffers nor reduces them.
        self._ddp_params_and_buffers_to_ignore = [f"teachers.{k}" for k in self.teachers.state_dict()]
        self.register_state_dict_post_hook(_drop_teachers)
        self.register_teachers()
        if specs:
            for term in self.losses:
                if isinstance(term, DistillLoss):
                    if cache_teacher and not term.cacheable:
                        raise ValueError(f"cache_teacher=true stores teacher logits and FeatureHint features only; {term.name} ({type(term).__name__}) "
                                         "needs the online teacher (its inputs vary in length). Set cache_teacher: false.")
                    pool_of(self).attach(term, self)  # teachers, layer names and indices checked now

    def register_teachers(self) -> None:
        """Put the teachers in this module's teacher pool: ``teacher: k`` of a term is ``teachers[k]``."""
        pool = pool_of(self)
        for k, (teacher, has_head) in enumerate(zip(self.teachers, self.has_head)):
            pool.add(k, teacher, has_head, label=self.hparams.teachers[k], default=True)

    # -- teachers stay inert -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teachers.eval()
        return self

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        if not any(k.startswith("teachers.") for k in state_dict):
            state_dict = {**state_dict, **{f"teachers.{k}": v for k, v in self.teachers.state_dict().items()}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- setup: check shapes, build projectors and the cache, all before training --------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and not len(self.teachers) and any(isinstance(t, DistillLoss) and not isinstance(t.teacher, (str, dict)) for t in self.losses):
            raise ValueError("DistillationModule: teachers is empty; give at least one teacher (.ckpt or model name) to fit")
        self.register_teachers()
        super().setup(stage)
        if sharding.is_sharding(self.trainer.strategy) and not self.save_teachers:
            # Lightning's sharded single-file loader checks every key of the module itself (not through load_state_dict
            # below), and the teachers are not in the checkpoint: they load from their own files
            self.strict_loading = False
        if stage == "fit" and self.cache_teacher:
            build_cache(self, pool_of(self), self.cache_dir, self.approximate_cache_targets)

    def teacher_outputs(self, x: Any) -> list:
        """Every teacher's outputs on ``x`` (what the terms request from it), computed now."""
        pool = pool_of(self)
        return [pool.teachers[k].run(x) for k in range(len(self.teachers))]

    def cached_teacher_outputs(self, index: torch.Tensor) -> list:
        """Every teacher's cached outputs for the samples ``index`` (after ``setup`` with ``cache_teacher``)."""
        pool = pool_of(self)
        return [pool.teachers[k].cache.outputs(index, self.device) for k in range(len(self.teachers))]


def _drop_teachers(module: DistillationModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: leave the teachers out of checkpoints unless ``save_teachers``."""
    if not module.save_teachers:
        for key in [k for k in state_dict if k.startswith(prefix + "teachers.")]:
            del state_dict[key]
