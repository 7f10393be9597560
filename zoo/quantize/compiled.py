"""Compiling a torchao int8 model for fast CPU inference (the ``compile`` option of :class:`~zoo.quantize.Quantize`).

Plain ``torch.compile`` runs torchao's int8 dynamic-activation Linears as ``_int_mm`` (oneDNN's s8 x s8 GEMM) plus
fused scaling: on CPU that GEMM is slow for narrow inputs (MiniLM's 384 -> 1536 projection: 12.8 ms vs 3.7 ms below,
batch 32 x 64 tokens, one thread). With Inductor's *freezing* and torchao's X86 Inductor passes registered (importing
``x86_inductor_quantizer`` registers them; they are what the PT2E X86 recipe uses), Inductor matches torchao's
``_int_mm`` pattern and replaces it with oneDNN ``qlinear_pointwise`` on prepacked weights: the same integers (the int8
activations shifted to uint8 with zero point 128), the per-row weight scales applied in the GEMM, the per-token scale
and the bias after. MiniLM-L6 at batch 32 (compiled int8 over compiled float): 0.59 -> 0.43.

Freezing compiles the weights in as constants, for inference (no grad): a frozen model must not be trained or have
weights loaded after its first call (``torch._dynamo.reset()`` to recompile). The import also sets Inductor's
``pre_grad_custom_pass`` to torchao's ``quant_lift_up`` for the process (as ``zoo.quantize.pt2e`` does).
"""

from __future__ import annotations

import itertools
import weakref

from torch import nn


class _Freezing:
    """Calls a compiled callable with Inductor freezing on while ``model`` is on the CPU. Dynamo reads the flag when it
    traces (to keep the weights as constants) and Inductor when it compiles, both at a call (a new input shape or device
    recompiles), so ``torch.compile``'s ``options={"freezing": True}`` (applied at Inductor's compile only) is not
    enough: every call sets it. On another device the call runs as plain ``torch.compile`` (torchao's X86 passes, which
    run only under freezing, would put oneDNN ops on its tensors)."""

    def __init__(self, fn, model: nn.Module):
        self.fn, self.model = fn, weakref.ref(model)

    def __call__(self, *args, **kwargs):
        from torch._inductor import config

        model = self.model()
        tensor = None if model is None else next(itertools.chain(model.parameters(), model.buffers()), None)
        if tensor is not None and tensor.device.type != "cpu":
            return self.fn(*args, **kwargs)
        with config.patch(freezing=True):
            return self.fn(*args, **kwargs)


def compile_quantized(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``model.compile(**compile_kwargs)`` in place (state_dict keys unchanged; compilation happens at the first call);
    calls on the CPU run with Inductor freezing and torchao's X86 passes registered (oneDNN int8 GEMMs)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the int8 weight-prepack passes)

    model.compile(**compile_kwargs)
    # nn.Module.compile keeps the compiled __call__ in _compiled_call_impl (dropped on copy and pickle, as compile is)
    model._compiled_call_impl = _Freezing(model._compiled_call_impl, model)
    return model
