"""Knowledge distillation: a student learns from frozen teachers through loss terms that any zoo module can sum.

Terms (:class:`~zoo.losses.LossTerm` subclasses, each with its teacher; subclass :class:`DistillLoss` to add one):

* :class:`SoftTargetKL`: KL between temperature-softened teacher and student distributions, times T^2
  (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").
* :class:`DecoupledKD`: target-class (TCKD) and non-target-class (NCKD) terms weighted by ``alpha``/``beta``
  (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").
* :class:`FeatureHint`: MSE between features of named layers, taken with forward hooks, through a learned
  projector when widths differ (Romero et al., ICLR 2015, "FitNets").
* :class:`HiddenStateDistill` / :class:`AttentionDistill`: transformer hidden states and attention maps between
  chosen layer pairs (Jiao et al., 2020, "TinyBERT"; Wang et al., 2020, "MiniLM").
* :class:`HardCE`: the labels' cross-entropy, i.e. :class:`zoo.losses.CrossEntropy` (the old name).

Teachers are inert: eval mode, ``requires_grad=False``, outside the optimizer, the checkpoint and DDP (a
:class:`DistillationModule` keeps its list in the checkpoint with ``save_teachers: true``). Terms that name the
same teacher share one loaded model, run once per step. With ``cache_teacher: true`` the teachers' logits (and
FeatureHint features) are computed once over the training set into memory-mapped ``.npy`` files keyed by
``Batch.index`` (:mod:`zoo.distillation.cache`).

Any zoo module, with a teacher per term::

    model:
      class_path: zoo.Classifier
      init_args:
        model: zoo/convnet
        losses:
          - class_path: zoo.losses.CrossEntropy
            init_args: {weight: 0.1}
          - class_path: zoo.distillation.SoftTargetKL
            init_args: {weight: 0.9, temperature: 4, teacher: runs/teacher/checkpoints/best.ckpt}

or the preset, with the teachers listed once (a term's ``teacher: k`` is ``teachers[k]``)::

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
        cache_teacher: true                    # with `with_index: true` on the datamodule
"""

from zoo.distillation.cache import TeacherCache, build_cache
from zoo.distillation.losses import (
    AttentionDistill,
    DecoupledKD,
    DistillLoss,
    FeatureHint,
    HardCE,
    HardDistill,
    HiddenStateDistill,
    ModelOutputs,
    Request,
    SoftTargetKL,
    make_projector,
    projector_like,
)
from zoo.distillation.module import DistillationModule
from zoo.distillation.taps import StudentTaps, Taps, find_layer, transformer_kind
from zoo.distillation.teachers import HeadedBackbone, Teacher, TeacherPool, load_teacher, pool_of

__all__ = [
    "AttentionDistill", "DecoupledKD", "DistillLoss", "DistillationModule", "FeatureHint", "HardCE", "HardDistill", "HeadedBackbone", "HiddenStateDistill",
    "ModelOutputs", "Request", "SoftTargetKL", "StudentTaps", "Taps", "Teacher", "TeacherCache", "TeacherPool", "build_cache", "find_layer",
    "load_teacher", "make_projector", "pool_of", "projector_like", "transformer_kind",
]
