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
For the same reason a trained-only file (from a run without sharding) cannot resume sharded: the CLI refuses it before
training (:func:`check_sharded_resume`), and :func:`whole_checkpoint` writes the whole state once::

    python -m zoo.adapters.checkpoint runs/.../last.ckpt runs/.../last_whole.ckpt
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zoo import runtime, sharding

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


def holds_trained_only(state_dict: dict) -> bool:
    """Whether a state dict is trained-only (has a fingerprint entry in place of base parameters)."""
    return any(k == KEY or k.endswith("." + KEY) for k in state_dict)


def check_sharded_resume(ckpt_path: str | os.PathLike | None, strategy: Any) -> None:
    """Refuse, before training, to resume or evaluate a trained-only checkpoint file under a sharding strategy (its
    single-file loader needs every parameter and fails deep inside with a missing key): name the file and the way out."""
    if not ckpt_path or not sharding.is_sharding(strategy) or runtime.is_distributed_checkpoint(ckpt_path):
        return
    if str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
        return
    saved = runtime.load_checkpoint(ckpt_path, what="--ckpt_path", mmap=True)
    if holds_trained_only(saved.get("state_dict") or {}):
        whole = Path(ckpt_path).with_name(Path(ckpt_path).stem + "_whole.ckpt")
        raise ValueError(
            f"--ckpt_path {str(ckpt_path)!r} holds only the trained parameters (an adapter surgery's `checkpoint: trained`, "
            f"saved without sharding), and {sharding.describe(strategy)} loads a single checkpoint file only whole. Write the "
            f"whole state once, `python -m zoo.adapters.checkpoint {ckpt_path} {whole}` (add `--seed <the run's seed_everything>` "
            "for a base that is not pretrained), and resume from that file; or resume without sharding (one process or DDP).")


def whole_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, seed: int | None = None) -> Path:
    """Write the trained-only checkpoint ``src`` to ``dst`` with the whole state dict: the base parameters are rebuilt
    from the module's hyperparameters (:func:`zoo.load_zoo_module`, after ``seed_everything(seed)`` when given: the
    run's ``seed_everything``, for a base that is not pretrained) and checked against the saved fingerprint, as
    loading does; everything else (optimizer, loops, callbacks, hyperparameters) is copied as saved."""
    from lightning.pytorch import seed_everything

    from zoo.backbones import load_zoo_module

    ckpt = runtime.load_checkpoint(src, what="the trained-only checkpoint")
    state = ckpt["state_dict"]
    if not holds_trained_only(state):
        raise ValueError(f"{str(src)!r} already holds the whole state (no {KEY!r} entry): nothing to add")
    if seed is not None:
        seed_everything(seed, verbose=False)
    module = load_zoo_module(src)  # the rebuilt base, loaded as a resume would (fails on a different base)
    for key in [k for k in state if k == KEY or k.endswith("." + KEY)]:
        prefix = key[: -len(KEY)]
        errors: list[str] = []
        _fill_base(module.get_submodule(prefix.rstrip(".")), state, prefix, {}, True, [], [], errors)
        if errors:
            raise ValueError(f"{src}: {errors[0]}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a trained-only adapter checkpoint with the whole state dict "
                                                 "(the base rebuilt from the module's hyperparameters), e.g. to resume it sharded.")
    parser.add_argument("src", help="the trained-only checkpoint (.ckpt)")
    parser.add_argument("dst", help="where to write the whole checkpoint")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed_everything (a base that is not pretrained is rebuilt with it)")
    args = parser.parse_args()
    print(whole_checkpoint(args.src, args.dst, args.seed))
