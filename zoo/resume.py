"""Global RNG states for exact resume: torch CPU, CUDA (when in use), numpy and Python ``random``, per rank.

A checkpoint holds every rank's states (:func:`gather_rng_states`, a collective under ``torch.distributed``:
call it on every rank, as Lightning's checkpoint hooks are); a resumed run restores its own rank's
(:func:`restore_rng_states`), so dropout and other draws continue where the interrupted run stopped.
The zoo's training loaders (``datamodules.resumable.ResumableLoader``) carry these states in their
checkpointed state and restore them right before the first batch after a resume. All values are tensors,
ints, lists and tuples, so checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def rng_state() -> dict[str, Any]:
    """This process's global RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, e.g. per-rank state for rank 0's checkpoint (a collective under
    ``torch.distributed``: every rank must call it, as Lightning's checkpoint hooks are)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    objects: list[Any] = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective: every rank must call it)."""
    return gather_object(rng_state())


def restore_rng_states(states: list[dict[str, Any]]) -> bool:
    """Restore this rank's states from :func:`gather_rng_states`' list; False (with a warning) when the
    number of processes changed, where no rank's stream can be continued exactly."""
    rank, world = rank_and_world()
    if len(states) != world:
        rank_zero_warn(f"the checkpoint holds RNG states of {len(states)} process(es), this run has {world}: "
                       "random draws (dropout, ...) will not continue those of the interrupted run")
        return False
    set_rng_state(states[rank])
    return True
