"""Issue 16 item 18: DKD's official warm-up (mdistiller ``DKD.forward_train``): the loss is scaled by
``min(epoch / warmup, 1.0)``, warmup 20 in the official configs, with mdistiller's 1-based epoch (its trainer
starts at ``epoch = 1``), i.e. ``(current_epoch + 1) / 20`` in Lightning's 0-based count."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.batch import Batch
from zoo.distillation import DecoupledKD, DistillationModule
from zoo.distillation.losses import ModelOutputs
from zoo.losses import Step


class AtEpoch(DistillationModule):
    current_epoch = 0  # a plain attribute in place of the trainer's count (no trainer here)


def test_default_is_the_official_warmup_and_zero_turns_it_off():
    assert DecoupledKD().warmup == 20
    assert [DecoupledKD(warmup=0).warmup_scale(e) for e in (0, 5, 100)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="warmup"):
        DecoupledKD(warmup=-1)


@pytest.mark.parametrize("epoch", [0, 5, 19, 20, 30])
def test_term_is_the_plain_formula_times_min_epoch_over_warmup(epoch):
    torch.manual_seed(0)
    teacher = {"model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS, "pretrained": False, "untrained_head": True}
    module = AtEpoch(TINY_VIT, model_kwargs=TINY_VIT_KWARGS, teachers=[teacher], losses=[DecoupledKD(warmup=20)])
    module.current_epoch = epoch
    term = module.losses[-1]
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    module.train()
    logits = module(x)
    with torch.no_grad():
        t_logits = module.teachers[0].eval()(x)
    plain = DecoupledKD(warmup=0).distill(ModelOutputs(logits.detach()), [ModelOutputs(t_logits)], y)
    assert plain > 0
    got = term(Step(module=module, batch=Batch(x, y), logits=logits))
    torch.testing.assert_close(got.detach().double(), plain * min((epoch + 1) / 20, 1.0))
