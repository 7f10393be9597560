"""PD-Quant calibration (zoo.quantize.pdquant): against min-max on the same calibration batches, the real int8
static model's prediction KL is lower and the scales differ; the search simulates torchao's int8 static Linear."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.zoo.test_quantize import batches, tiny_vit
from zoo.quantize import MinMax, Quantize, quantize_module
from zoo.quantize.pdquant import PDQuant, fake_quant, fake_quant_rows, prediction_kl


def outlier_vit():
    module = tiny_vit()
    with torch.no_grad():  # outlier features, as trained transformers have (LayerNorm gains far above the rest)
        module.backbone.blocks[0].norm2.weight[3] = 20.0
        module.backbone.blocks[1].norm1.weight[5] = 15.0
    return module


def int8_kl(module, calibration, calibrator) -> tuple[float, dict]:
    with torch.no_grad():
        reference = torch.cat([module(b.inputs) for b in calibration])
    quantizer = Quantize("int8_static")
    quantize_module(module, quantizer, calibration, calibrator)
    with torch.no_grad():
        out = torch.cat([module(b.inputs) for b in calibration])
    return float(prediction_kl(out, reference)), quantizer.act_scales


def test_pdquant_prediction_kl_at_most_minmax_and_scales_differ():
    base, calibration = outlier_vit(), batches(2)
    kl_minmax, minmax_scales = int8_kl(copy.deepcopy(base), calibration, MinMax())
    pd = PDQuant(grid=20)
    kl_pd, pd_scales = int8_kl(copy.deepcopy(base), calibration, pd)
    assert kl_pd <= kl_minmax  # measured 1.7e-5 vs 3.3e-5 (lamb_r=0: 7.3e-6)
    assert pd.kl <= pd.kl_minmax  # the search's own (simulated) objective never rises
    assert abs(pd.kl_minmax - kl_minmax) < 0.2 * kl_minmax  # the simulation is the real int8 model's
    assert minmax_scales.keys() == pd_scales.keys()
    ratios = {n: float(pd_scales[n].flatten() / minmax_scales[n].flatten()) for n in pd_scales}
    assert all(r <= 1 + 1e-6 for r in ratios.values()) and any(r < 0.99 for r in ratios.values())
    assert ratios == pytest.approx(pd.ratios, abs=1e-5)  # scales are min-max's times the chosen grid ratio


def test_simulation_equals_torchao_int8_static_linear():
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 8), torch.randn(4, 5, 16)
    scale = (x.abs().amax() * 0.7 / 127).reshape(1, 1, 1)  # clipped, as a PD-Quant candidate
    with torch.no_grad():
        simulated = nn.functional.linear(fake_quant(x, scale), fake_quant_rows(layer.weight), layer.bias)
        quantizer = Quantize("int8_static")
        quantizer.calibrated({"0": scale}, {"0": 3})
        real = quantizer.apply(nn.Sequential(layer))(x)
    assert (real - simulated).norm() / simulated.norm() < 1e-5  # measured 1e-7 (int32 accumulation vs float)


@pytest.mark.parametrize("kwargs", [{"grid": 0}, {"min_ratio": 0.0}, {"min_ratio": 1.5}, {"temperature": 0.0}, {"lamb_r": -1.0}, {"rounds": 0}])
def test_bad_arguments_fail_naming_them(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        PDQuant(**kwargs)


def test_pdquant_plugs_into_the_ptq_callback_from_yaml(tmp_path, monkeypatch):
    from callbacks.quantize import PostTrainingQuantization
    from tests.helpers import ROOT
    from tests.standin import fit_config

    q = "--callbacks.quantize.init_args"
    run = fit_config(ROOT / "configs" / "quantize" / "ptq_vit.yaml", tmp_path, monkeypatch, "--trainer.max_steps=1",
                     "--data.init_args.batch_size=16", f"{q}.scheme=int8_static", f"{q}.calibration_batches=1",
                     f"{q}.calibrator=zoo.quantize.pdquant.PDQuant", f"{q}.calibrator.grid=4", f"{q}.calibrator.min_ratio=0.5",
                     "--model.init_args.model_kwargs.depth=1")
    (cb,) = [c for c in run.trainer.callbacks if isinstance(c, PostTrainingQuantization)]
    quantizer = run.model.surgery[-1]
    assert isinstance(cb.calibrator, PDQuant) and set(cb.calibrator.ratios) == set(quantizer.act_scales)
    assert cb.calibrator.kl <= cb.calibrator.kl_minmax and cb.report.scheme == "int8_static"
