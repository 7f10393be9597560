"""Checkpoints that hold only what was trained: the frozen base model is rebuilt from its name, not saved.

An adapter surgery (``checkpoint: trained``, the default) registers three public ``nn.Module`` state-dict hooks on
the backbone it changes:

* ``state_dict`` drops the backbone's *base* parameters (frozen, not part of an adapter) and adds one small entry,
  ``<prefix>adapters_base`` = a fingerprint of what it dropped. Trained parameters, adapter parameters (``lora_*``,
  also when another surgery froze them) and every buffer (BatchNorm statistics move in training) stay.
* ``load_state_dict`` of such a state dict first checks the fingerprint against the backbone's own base (built from
  the module's ``model`` / ``pretrained`` hyperparameters, then the surgery: Lightning calls ``configure_model``
  before loading) and fails on a different base; then it takes the missing base tensors from the backbone itself,
  so strict loading (Lightning's default, resume and :func:`zoo.load_zoo_module`) needs no change in the module.

So a checkpoint holds the head, the adapters and the hyperparameters (the base model's name): the state dict of
all-MiniLM-L6-v2 (22.9M parameters) with rank-8 DoRA in every attention and FFN layer is 1.5 MB instead of 92 MB.
A base that cannot be rebuilt from its name (``pretrained: false`` outside a seeded run) fails loading with a
message; use ``checkpoint: full`` on the surgery there.

Sharded (FSDP2, :mod:`zoo.sharding`) the checkpoint holds the whole state, as ``checkpoint: full``: torch's
distributed state dict (``get_model_state_dict``) maps every key to a module attribute, so it cannot carry the
fingerprint entry, and Lightning's single-file sharded loader requires every parameter. Each rank still writes only
its shards; such a checkpoint resumes sharded and loads on one process (:func:`zoo.load_zoo_module`) like any other.
For the same reason a trained-only file (from a run without sharding) cannot resume sharded as it is: the CLI refuses
it before training, and :mod:`zoo.reshard` writes it whole (:func:`fill_base`) in the sharded layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zoo import sharding

KEY = "adapters_base"  # the fingerprint entry, relative to the backbone's prefix
MODES = ("trained", "full")


def is_adapter(name: str) -> bool:
    """Whether a parameter name belongs to a PEFT adapter (``...qkv.lora_A.default.weight``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def base_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s base parameters (frozen and not adapters), tied copies included, sorted."""
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad and not is_adapter(n))


def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[numel, sum |x|, sum x * w]`` in float64 (``w`` a fixed wave over positions, so a permutation changes it)."""
    total = torch.zeros(3, dtype=torch.float64)
    for i, t in enumerate(tensors):
        flat = t.detach().flatten().to(torch.float64)
        wave = torch.sin(torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) * 0.7 + i)
        total += torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64),
                              flat.abs().sum().cpu(), (flat * wave).sum().cpu()])
    return total


def _drop_base(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if prefix + KEY in state_dict:  # another adapter surgery's hook on the same backbone already did it
        return
    if sharding.is_sharded(module):  # the whole state: see the module docstring
        return
    names = [n for n in base_names(module) if prefix + n in state_dict]
    state_dict[prefix + KEY] = fingerprint([state_dict[prefix + n] for n in names])
    for n in names:
        del state_dict[prefix + n]


def _fill_base(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    if prefix + KEY not in state_dict:
        return  # a full state dict
    saved = state_dict.pop(prefix + KEY).to(torch.float64).cpu()
    own = dict(module.named_parameters(remove_duplicate=False))
    names = [n for n in base_names(module) if prefix + n not in state_dict]
    mine = fingerprint([own[n] for n in names])
    if not torch.allclose(saved, mine, rtol=1e-5, atol=1e-6 * math.sqrt(max(saved[0].item(), 1.0))):
        error_msgs.append(
            f"the checkpoint holds only trained parameters of `{prefix.rstrip('.')}`, made on a different base model than "
            f"the one rebuilt now (fingerprint {saved.tolist()} saved, {mine.tolist()} rebuilt over {len(names)} base "
            "tensors). The base is rebuilt from the module's `model`/`pretrained` hyperparameters: a randomly initialised "
            "base (pretrained: false, no seed) cannot be; train with `checkpoint: full` on the adapter surgery there."
        )
        return
    for n in names:
        state_dict[prefix + n] = own[n].detach()


def keep_trained_only(model: nn.Module) -> list[RemovableHandle]:
    """Register the hooks (see the module docstring) on ``model``; remove the returned handles to stop."""
    return [model.register_state_dict_post_hook(_drop_base), model.register_load_state_dict_pre_hook(_fill_base)]


def check_mode(checkpoint: str, who: str) -> str:
    if checkpoint not in MODES:
        raise ValueError(f"{who}: checkpoint={checkpoint!r}: expected 'trained' (only what was trained, the base rebuilt "
                         f"from the model's name) or 'full'")
    return checkpoint


def release(handles: list[RemovableHandle]) -> list[RemovableHandle]:
    for h in handles:
        h.remove()
    return []


def release_and_thaw(surgery: Any, model: nn.Module) -> nn.Module:
    """The end of an adapter's ``undo``: drop ``surgery.handles`` (the trained-only checkpoint hooks) and thaw the
    parameters of ``model`` named in ``surgery.frozen`` (what ``transform`` froze)."""
    surgery.handles = release(getattr(surgery, "handles", []))
    params = dict(model.named_parameters())
    for name in getattr(surgery, "frozen", []):
        if name in params:
            params[name].requires_grad_(True)
    return model


def fingerprint_keys(state_dict: dict) -> list[str]:
    """The fingerprint entries of a trained-only state dict (one per backbone an adapter surgery changed)."""
    return [k for k in state_dict if k == KEY or k.endswith("." + KEY)]


def holds_trained_only(state_dict: dict) -> bool:
    """Whether a state dict is trained-only (has a fingerprint entry in place of base parameters)."""
    return bool(fingerprint_keys(state_dict))


def fill_base(module: nn.Module, state_dict: dict, what: str = "checkpoint") -> None:
    """Make a trained-only ``state_dict`` of ``module`` whole, in place: each fingerprint entry checked against
    ``module``'s own base (rebuilt from its hyperparameters) and replaced by its base tensors, as loading does."""
    for key in fingerprint_keys(state_dict):
        prefix, errors = key[: -len(KEY)], []
        _fill_base(module.get_submodule(prefix.rstrip(".")), state_dict, prefix, {}, True, [], [], errors)
        if errors:
            raise ValueError(f"{what}: {errors[0]}")
