"""Quantisation with torchao: post-training int8 (weight-only, dynamic and static activations) and
quantisation-aware training (torchao's fake quantizers on a schedule), issue 20.

==================  ==========================================================================================
``schemes``         :data:`SCHEMES`: each scheme's torchao config, the layer types it handles, its calibration
``layers``          :func:`select_layers` (the check of unsupported layers), :func:`fold_batchnorm`
``surgery``         :class:`Quantize`: the int8 model as a surgery (a saved quantised module reloads)
``calibration``     :class:`Calibrator`, :class:`MinMax` (pluggable), :func:`take_batches`, :func:`relative_error`
``fake``            QAT's fake quantizers attached to the model's own Linears (simulating the converted scheme
                    exactly), :func:`freeze` (observers)
``pt2e``            ``int8_pt2e``: PT2E static int8 of a whole exported (convolutional) backbone
``pt2e_qat``        QAT for ``int8_pt2e``: torchao ``prepare_qat_pt2e`` / ``convert_pt2e`` on the callback's schedule
``ptq``             :func:`quantize_module`: calibrate, quantise, measure (shared by both callbacks)
``compiled``        :func:`compile_quantized`: torch.compile for int8 on CPU (Inductor freezing, oneDNN int8 GEMMs)
==================  ==========================================================================================

Callbacks: ``callbacks.quantize.PostTrainingQuantization`` (after fit) and
``callbacks.quantize.QuantizationAwareTraining`` (a schedule). Configs: ``configs/quantize/``.
"""

from zoo.quantize.compiled import compile_quantized
from zoo.quantize.calibration import Calibrator, MinMax, relative_error, state_bytes, take_batches
from zoo.quantize.layers import fold_batchnorm, has_batchnorm, select_layers
from zoo.quantize.ptq import QuantizeReport, quantize_module
from zoo.quantize.schemes import SCHEMES, Scheme, get_scheme
from zoo.quantize.surgery import Quantize
from zoo.quantize.pdquant import PDQuant
from zoo.quantize.splitquant import SplitQuant
