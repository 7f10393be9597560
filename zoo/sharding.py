"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``.

A zoo module shards itself in ``configure_model`` when the strategy gives it a device mesh
(``LightningModule.device_mesh``): each block of the backbone's family (:mod:`zoo.families`) is one FSDP unit
(its parameters gathered just before it runs and freed after), then every top-level part with parameters
(``backbone``, ``head``, trainable loss terms) is one more unit, so every trainable parameter is sharded and its
gradient reduced across ranks. Teachers live outside the module (:func:`zoo.distillation.teachers.pool_of`): each
rank holds a whole frozen copy, outside the optimizer. On CPU (gloo) use::

    trainer:
      accelerator: cpu
      devices: 2
      strategy:
        class_path: lightning.pytorch.strategies.ModelParallelStrategy
        init_args: {data_parallel_size: 2, tensor_parallel_size: 1}

(``FSDPStrategy``, FSDP1, refuses CPU; on GPUs both work, and ``ModelParallelStrategy`` is the FSDP2 path.)

A part that needs whole parameters declares it with a ``sharding`` attribute (a reason string; see
:func:`check_strategy`): such a module is refused under a sharding strategy before training starts.
"""

from __future__ import annotations

from typing import Any

from torch import nn

SHARDING_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")
WHOLE_PARAMETER_STRATEGIES = "single device, DDP (`ddp`, `ddp_spawn`), DeepSpeed stages 1-2"


def is_sharding(strategy: Any) -> bool:
    """Whether ``strategy`` splits parameters across ranks (FSDP1/2, DeepSpeed stage 3)."""
    name = type(strategy).__name__
    if name == "DeepSpeedStrategy":
        return int(getattr(strategy, "config", {}).get("zero_optimization", {}).get("stage", 0)) >= 3
    return name in ("ModelParallelStrategy", "FSDPStrategy")


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel dimension of Lightning's 2-D mesh (``data_parallel`` x ``tensor_parallel``)."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"the zoo shards with data parallelism only: tensor_parallel_size={mesh['tensor_parallel'].size()}; "
                         "set ModelParallelStrategy(data_parallel_size=<ranks>, tensor_parallel_size=1)")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def block_units(module: nn.Module) -> list[nn.Module]:
    """The backbone's blocks (by :mod:`zoo.families`), or none for a backbone of an unknown family."""
    from zoo import families

    backbone = getattr(module, "backbone", None)
    if backbone is None or families.find_family(backbone) is None:
        return []
    root = families.root_of(backbone)
    return [root.get_submodule(name) for name, _ in families.blocks(backbone)]


def shard(module: nn.Module, mesh: Any, units: list[nn.Module] | None = None, mp_policy: Any = None) -> list[str]:
    """``fully_shard`` the ``units`` (default: :func:`block_units`), then each top-level child that holds parameters.

    Returns the names of the top-level parts sharded. Fails naming any trainable parameter left unsharded (its
    gradient would not be reduced across ranks)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dp = data_parallel_mesh(mesh)
    kwargs = {"mesh": dp} if mp_policy is None else {"mesh": dp, "mp_policy": mp_policy}
    for unit in block_units(module) if units is None else units:
        fully_shard(unit, **kwargs)
    parts = []
    for name, child in module.named_children():
        if any(True for _ in child.parameters()):
            fully_shard(child, **kwargs)
            parts.append(name)
    left = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"{type(module).__name__}: parameters {left[:5]} are not sharded (not inside a top-level submodule)")
    return parts


def check_strategy(module: nn.Module, strategy: Any, parts: list[Any]) -> None:
    """Refuse a sharding strategy when one of ``parts`` (surgery, loss terms, callbacks) needs whole parameters.

    A part says so with a ``sharding`` attribute: ``None`` (works on shards) or a string saying why not."""
    if not is_sharding(strategy):
        return
    for part in parts:
        reason = getattr(part, "sharding", None)
        if isinstance(reason, str) and reason:
            raise ValueError(f"{type(module).__name__}: {type(part).__name__} cannot train under {type(strategy).__name__} "
                             f"({reason}). Strategies that work: {WHOLE_PARAMETER_STRATEGIES}"
                             + ("" if type(strategy).__name__ == "ModelParallelStrategy" else ", and ModelParallelStrategy (FSDP2)")
                             + " where the part supports it.")
