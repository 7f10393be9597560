"""Parameter-efficient finetuning as model surgery (issue 19): adapters with a way back to a plain model.

==================  ===========================================================================================
``targets``         :func:`select`: which layers (name pattern, or parts of blocks from :mod:`zoo.families`)
``lora``            :class:`LoRA`: LoRA / DoRA through ``peft`` (``undo`` = merge into a plain model)
``keys_values``     :class:`KeysValues`: train only the FFN keys or only the values of chosen blocks
``checkpoint``      checkpoints with only what was trained (the base is rebuilt from the model's name)
``dynamic_rank``    dynamic-rank DoRA (Mao et al.) and its budget schedule
``e3va``            E3VA adapters on a gradient highway (Yin et al.)
==================  ===========================================================================================

YAML, on any zoo module::

    surgery:
      - class_path: zoo.adapters.LoRA
        init_args: {parts: [attention], blocks: ["2..5"], r: 8, alpha: 16, dora: true}
"""

from zoo.adapters.checkpoint import keep_trained_only
from zoo.adapters.keys_values import KeysValues
from zoo.adapters.lora import LoRA, lora_layers
from zoo.adapters.targets import PARTS, adaptable, adaptable_layers, block_names, layer_dims, select

__all__ = ["PARTS", "KeysValues", "LoRA", "adaptable", "adaptable_layers", "block_names", "keep_trained_only", "layer_dims",
           "lora_layers", "select"]

# The other adapters (dynamic-rank DoRA, E3VA) are re-exported from their modules once those exist: the names in
# the module's ``__all__``, or else every public class and function defined there.
import importlib as _importlib
import importlib.util as _util


def _public(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__]


for _name in ("dynamic_rank", "e3va", "emoe_lora"):
    if _util.find_spec(f"zoo.adapters.{_name}") is not None:
        _module = _importlib.import_module(f"zoo.adapters.{_name}")
        _names = [n for n in _public(_module) if n not in globals()]
        globals().update({n: getattr(_module, n) for n in _names})
        __all__ += _names
