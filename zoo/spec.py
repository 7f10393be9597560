"""Parts (surgery, loss terms) as plain ``{class_path, init_args}`` data, the way LightningCLI writes them.

A module stores its parts this way in its hyperparameters, so a checkpoint loads with ``weights_only`` and
rebuilds the same parts; each init argument of a part must be an attribute of the same name.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any


def plain(value: Any) -> Any:
    """Tuples become lists (YAML and ``weights_only`` checkpoints hold lists)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_of(part: Any) -> dict[str, Any]:
    """``{class_path, init_args}`` of ``part``: each ``__init__`` argument read from the attribute of its name."""
    names = [n for n in inspect.signature(type(part).__init__).parameters if n not in ("self", "args", "kwargs")]
    args = {n: plain(getattr(part, n)) for n in names if hasattr(part, n)}
    return {"class_path": f"{type(part).__module__}.{type(part).__qualname__}", "init_args": args}


def instantiate(spec: Any, base: type, what: str) -> Any:
    """``spec`` if it is a ``base``; built from its ``{class_path, init_args}`` if that names a ``base`` subclass."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, base):
            return cls(**spec.get("init_args", {}))
    raise ValueError(f"{what}: {spec!r} is not a {base.__module__}.{base.__qualname__} (or its {{class_path, init_args}})")
