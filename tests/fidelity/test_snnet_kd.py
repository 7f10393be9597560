"""Issue 16 item 3: SN-Net's distillation term, as in the official code (DeiT's DistillationLoss).

Official soft: ``kl_div(log_softmax(s/T), log_softmax(t/T), reduction='sum', log_target=True) * T*T / s.numel()``;
official hard: ``cross_entropy(s, t.argmax(1))``; ours by default: the KL averaged over the batch (``classes`` times stronger).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.batch import Batch
from zoo.distillation import SoftTargetKL
from zoo.distillation.losses import HardDistill, ModelOutputs
from zoo.losses import CrossEntropy
from zoo.snnet import SNNetModule


def logits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (6,), generator=g)


def test_soft_numel_is_the_official_formula_and_batchmean_is_classes_times_stronger():
    s, t, y = logits(0)
    T = 2.0
    p_t = F.softmax(t / T, -1)
    kl_sum = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum()  # by hand
    official = kl_sum * T * T / s.numel()
    numel = SoftTargetKL(temperature=T, reduction="numel").compute(ModelOutputs(s), ModelOutputs(t), y)
    batchmean = SoftTargetKL(temperature=T).compute(ModelOutputs(s), ModelOutputs(t), y)
    torch.testing.assert_close(numel, official)
    torch.testing.assert_close(batchmean, kl_sum * T * T / s.shape[0])
    torch.testing.assert_close(batchmean, numel * s.shape[1])


def test_hard_is_cross_entropy_on_the_teachers_argmax():
    s, t, y = logits(1)
    by_hand = -F.log_softmax(s, -1)[torch.arange(6), t.argmax(-1)].mean()
    torch.testing.assert_close(HardDistill().compute(ModelOutputs(s), ModelOutputs(t), y), by_hand)
    assert not torch.equal(t.argmax(-1), y)  # the teacher's labels, not the targets


def anchor(width: int) -> dict:
    return {"model": TINY_VIT, "model_kwargs": {**TINY_VIT_KWARGS, "embed_dim": width, "depth": 2}}


def test_snnet_distill_type_picks_the_term():
    make = lambda kind: SNNetModule([anchor(32), anchor(16)], teacher="largest", distill_alpha=0.5, distill_type=kind)  # noqa: E731
    assert make("soft").loss_term(SoftTargetKL).reduction == "batchmean"
    assert make("soft_numel").loss_term(SoftTargetKL).reduction == "numel"
    module = make("hard")
    assert inspect.signature(SNNetModule).parameters["distill_type"].default == "hard"  # the official recipe is the default
    assert module.loss_term(SoftTargetKL) is None and module.loss_term(HardDistill).teacher == "largest"
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    teacher_logits = module.net.heads[-1](module.net.anchors[-1](x)).detach()
    module.train()
    loss, out, _ = module.training_loss(Batch(x, y))
    expected = 0.5 * F.cross_entropy(out, y) + 0.5 * F.cross_entropy(out, teacher_logits.argmax(-1))
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    assert module.loss_term(CrossEntropy).weight == 0.5
