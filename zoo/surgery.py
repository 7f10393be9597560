"""Model surgery: small reversible transforms of an ``nn.Module``, applied in order to a module's backbone.

Like PEFT's ``get_peft_model`` / ``merge_and_unload``: :meth:`Surgery.apply` changes a model (turns FFNs into
experts, freezes layers, ...) and :meth:`Surgery.undo` gives back a plain model that computes the same function.
A zoo module takes an ordered list from YAML and applies it to its backbone in ``configure_model`` (so a
checkpoint resumes onto the same structure)::

    model:
      class_path: zoo.Classifier
      init_args:
        model: timm/vit_tiny_patch16_224
        surgery:
          - class_path: zoo.subtuning.Freeze
            init_args: {trainable_layers: [blocks.10, blocks.11]}
          - class_path: zoo.emoe.Moefy
            init_args: {num_experts: 8, top_k: 2, layers: ["*"]}

Applying surgery never thaws a frozen part: a parameter created inside a module whose parameters were all frozen
before the transform is frozen too (so experts made inside SubTuning's frozen prefix stay frozen).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo import spec


class Surgery:
    """Base of the transforms. Subclasses implement :meth:`transform` and :meth:`undo`; call the object (or
    :meth:`apply`) to run it with the frozen-part rule. Arguments are checked in ``__init__``; what depends on
    the model (layer names, widths) is checked in :meth:`transform` with a message naming the valid choices."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Run :meth:`transform`, then freeze every new parameter made inside a part that was frozen."""
        frozen = frozen_modules(model)
        kept = list(model.parameters())  # alive while ids are compared: a freed parameter's id can be reused
        before = {id(p) for p in kept}
        model = self.transform(model)
        for name, p in model.named_parameters():
            if id(p) not in before and p.requires_grad and any(name.startswith(m + ".") for m in frozen):
                p.requires_grad_(False)
        return model

    __call__ = apply

    def transform(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def undo(self, model: nn.Module) -> nn.Module:
        """A plain model computing the same function (the inverse of :meth:`transform`, or a merge)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}`` of this transform (plain data for the hyperparameters)."""
        return spec.config_of(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config()["init_args"].items())
        return f"{type(self).__name__}({args})"


def frozen_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that do not require gradients (what :func:`restore_trainability` restores)."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def restore_trainability(model: nn.Module, frozen: set[str] | None) -> None:
    """Every parameter of ``model`` trainable except those named in ``frozen`` (an undo's way back)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n not in (frozen or ()))


def frozen_modules(model: nn.Module) -> list[str]:
    """Names of the modules (not the root) that own parameters, all of them frozen."""
    out = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params):
            out.append(name)
    return out


def instantiate(part: Surgery | dict[str, Any]) -> Surgery:
    """A transform, or its ``{class_path, init_args}`` (as stored in a checkpoint's hyperparameters)."""
    return spec.instantiate(part, Surgery, "surgery")


def apply_all(model: nn.Module, transforms: list[Surgery]) -> nn.Module:
    for t in transforms:
        model = t.apply(model)
    return model


def undo_all(model: nn.Module, transforms: list[Surgery]) -> nn.Module:
    """Undo the transforms in reverse order: a plain model."""
    for t in reversed(transforms):
        model = t.undo(model)
    return model
