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

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from zoo.surgery import Surgery

SHARDING_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")
WHOLE_PARAMETER_STRATEGIES = "single device, DDP (`ddp`, `ddp_spawn`), DeepSpeed stages 1-2"


def is_sharding(strategy: Any) -> bool:
    """Whether ``strategy`` splits parameters across ranks (FSDP1/2, DeepSpeed stage 3)."""
    name = type(strategy).__name__
    if name == "DeepSpeedStrategy":
        return int(getattr(strategy, "config", {}).get("zero_optimization", {}).get("stage", 0)) >= 3
    return name in ("ModelParallelStrategy", "FSDPStrategy")


def data_parallel_mesh(mesh: Any, module: nn.Module | None = None) -> Any:
    """The data-parallel dimension of Lightning's 2-D mesh (``data_parallel`` x ``tensor_parallel``); a mesh with
    ``tensor_parallel`` above 1 is refused (:func:`tensor_parallel_size`)."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    tensor_parallel_size(module if module is not None else nn.Module(), mesh)
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
    """``fully_shard`` the ``units`` (default: :func:`block_units`), then each top-level child that holds trainable
    parameters (the items of a ``ModuleList``/``ModuleDict`` child, e.g. loss terms with projectors); a child frozen
    whole (a distillation preset's ``teachers``) is not sharded: each rank keeps a whole copy, outside the optimizer.

    Returns the names of the top-level parts sharded. Fails naming any trainable parameter left unsharded (its
    gradient would not be reduced across ranks)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dp = data_parallel_mesh(mesh, module)
    kwargs = {"mesh": dp} if mp_policy is None else {"mesh": dp, "mp_policy": mp_policy}
    for unit in block_units(module) if units is None else units:
        fully_shard(unit, **kwargs)
    parts = []
    for name, child in _parts(module):
        if any(p.requires_grad for p in child.parameters()):  # a frozen part (a teacher) stays whole on every rank
            fully_shard(child, **kwargs)
            parts.append(name)
    for owner in module.modules():  # each module that owns buffers, so that a part run piecewise (SubTuning's) is covered
        if any(True for _ in owner.buffers(recurse=False)) and not isinstance(owner, nn.ModuleList):
            owner.register_forward_pre_hook(_broadcast_buffers)
    left = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"{type(module).__name__}: parameters {left[:5]} are not sharded (not inside a top-level submodule)")
    return parts


@torch.no_grad()
def _broadcast_buffers(owner: nn.Module, args: Any) -> None:
    """Rank 0's buffers (BatchNorm statistics, ...) on every rank before the module that owns them runs in training
    mode, as DDP's ``broadcast_buffers`` does at each forward: FSDP shards parameters only, and buffers updated from
    each rank's batch would drift apart."""
    import torch.distributed as dist

    if not (owner.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for b in owner.buffers(recurse=False):
        by_kind.setdefault((b.dtype, b.device), []).append(b)
    for buffers in by_kind.values():  # one broadcast per dtype
        flat = torch.cat([b.reshape(-1) for b in buffers])
        flat = flat.to(torch.uint8) if flat.dtype == torch.bool else flat  # gloo broadcasts no bool
        dist.broadcast(flat, src=0)
        for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(v.view_as(b))


def _parts(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The top-level children, a container's (``losses: ModuleList``) replaced by its items: FSDP2 shards modules
    that run ``forward``, and a container has none."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out += _parts(child, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", child))
    return out


def check_strategy(module: nn.Module, strategy: Any, parts: list[Any]) -> None:
    """Refuse, before training, a strategy the module cannot train under (naming the module, the part, what works):

    - a sharding strategy when one of ``parts`` (surgery, loss terms, callbacks) needs whole parameters: a part says so
      with a ``sharding`` attribute, ``None`` (works on shards) or a string saying why not;
    - DeepSpeed ZeRO stage 3 with any surgery (it rewrites the backbone in ``configure_model``, where ZeRO-3 partitions
      each new parameter as it is made, so the surgery cannot copy whole weights into it);
    - ``ModelParallelStrategy`` with ``tensor_parallel_size > 1`` (the zoo shards whole blocks, data parallel only)."""
    name = type(strategy).__name__
    if name == "ModelParallelStrategy":
        tensor_parallel_size(module, getattr(module, "device_mesh", None))
    if not is_sharding(strategy):
        return
    for part in parts:
        reason = getattr(part, "sharding", None)
        if not (isinstance(reason, str) and reason) and name == "DeepSpeedStrategy" and isinstance(part, Surgery):
            reason = "it rewrites the backbone in configure_model, where ZeRO stage 3 partitions every new parameter as it is made"
        if isinstance(reason, str) and reason:
            shards_ok = name != "ModelParallelStrategy" and getattr(part, "sharding", None) is None
            raise ValueError(f"{type(module).__name__}: {type(part).__name__} cannot train under {describe(strategy)} "
                             f"({reason}). Strategies that work: {WHOLE_PARAMETER_STRATEGIES}"
                             + (", and ModelParallelStrategy (FSDP2, configs/strategies/sharded_*.yaml)" if shards_ok else "") + ".")


def describe(strategy: Any) -> str:
    """The strategy's class, with the DeepSpeed ZeRO stage."""
    name = type(strategy).__name__
    if name == "DeepSpeedStrategy":
        return f"DeepSpeedStrategy (ZeRO stage {int(getattr(strategy, 'config', {}).get('zero_optimization', {}).get('stage', 0))})"
    return name


def tensor_parallel_size(module: nn.Module, mesh: Any) -> int:
    """The tensor-parallel size of Lightning's mesh (1 without one); above 1, fail naming the module and what works."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    size = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if size > 1:
        raise ValueError(f"{type(module).__name__}: the zoo shards every block whole with FSDP2 (zoo/sharding.py, data parallel "
                         f"only), so it cannot train under ModelParallelStrategy(tensor_parallel_size={size}). Set "
                         f"ModelParallelStrategy(data_parallel_size=<all ranks>, tensor_parallel_size=1) "
                         f"(configs/strategies/sharded_cpu.yaml, sharded_gpu.yaml), or use DDP.")
    return size


def check_accelerator(module: nn.Module, strategy: Any, accelerator: Any) -> None:
    """Before the Trainer is built: ``FSDPStrategy`` (FSDP1) runs on CUDA only; say, naming the module, what works on CPU.

    ``strategy`` and ``accelerator`` as given to the Trainer (instances or names)."""
    fsdp1 = type(strategy).__name__ == "FSDPStrategy" or (isinstance(strategy, str) and strategy.lower().rsplit(".", 1)[-1].startswith("fsdp"))
    cuda = accelerator in ("cuda", "gpu") or type(accelerator).__name__ == "CUDAAccelerator"
    if fsdp1 and not cuda:
        shown = accelerator if isinstance(accelerator, str) or accelerator is None else type(accelerator).__name__
        raise ValueError(f"{type(module).__name__}: FSDPStrategy (FSDP1) runs on CUDA GPUs only (accelerator={shown!r}). "
                         f"Sharded on CPU: ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1), FSDP2 "
                         f"over gloo (configs/strategies/sharded_cpu.yaml); or DDP (`strategy: ddp`). On GPUs set "
                         f"accelerator: gpu (configs/strategies/sharded_gpu.yaml).")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied in ``module`` (its parameters are ``DTensor`` shards, except while FSDP holds
    them gathered: a unit's inside its forward, the root's after a forward until the backward)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: nn.Module) -> None:
    """Put every FSDP unit in ``module`` back to its shards (FSDP's root keeps its parameters gathered after a forward
    until a backward, e.g. after validation), so that writes to the parameters reach the shards. Outside forward/backward."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextmanager
def unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the parameters of ``module``'s own FSDP unit are whole (its sub-units still gather theirs
    in their ``forward``): for code that uses them outside ``module.forward`` (SN-Net's least-squares features).
    Writes to them are not kept when the block ends: write with :func:`copy_whole` after it."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a ``DTensor`` gathered (or summed, for a partial one) with ``full_tensor`` -- a collective,
    so every rank calls it, in the same order -- any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(reference: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """The whole tensor ``value`` laid out as ``reference``: this rank's part of it when ``reference`` is sharded (no
    communication: each rank takes its own part), else ``value``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(reference.device), reference.device_mesh, reference.placements, src_data_rank=None)
    return value


@torch.no_grad()
def copy_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``: into this rank's shard when ``param`` is sharded (no communication)."""
    param.copy_(like(param, value.to(param.device, param.dtype)))


def fill_optimizer_states(checkpoint: dict, module: nn.Module) -> None:
    """Give every parameter an optimizer state in a sharded checkpoint: a parameter that has had no gradient yet (an
    SN-Net stitch not sampled so far) has none, but resuming a distributed checkpoint expects one for each parameter
    (torch.distributed.checkpoint loads into a fresh optimizer whose states were all created). The state added is the
    optimizer's own first state (zeros, step 0: what Adam/AdamW create at the first gradient; SGD's momentum buffer as
    zeros, the same with dampening 0), so the resumed run trains as the uninterrupted one. Called from
    ``on_save_checkpoint`` on every rank."""
    from torch.distributed.tensor import DTensor

    for optimizer in checkpoint.get("optimizer_states", []):
        state = optimizer.get("state")
        names = [n for group in optimizer.get("param_groups", []) for n in group.get("params", [])]
        if state is None or not all(isinstance(n, str) for n in [*names, *state]):  # not the name-keyed state of a sharded run
            continue
        if not state:  # a stateless optimizer (SGD without momentum): empty states, which Lightning's resume needs
            state.update({n: {} for n in names})  # (its single-file loader reads the first key) and which load as nothing
            continue
        template = next(iter(state.values()))
        for group in optimizer.get("param_groups", []):
            for name in group.get("params", []):
                if name in state or not isinstance(name, str):
                    continue
                param = module.get_parameter(name)
                first = {}
                for key, value in template.items():
                    if isinstance(value, DTensor):
                        first[key] = torch.zeros_like(param.detach(), dtype=value.dtype).to(value.device)
                    elif torch.is_tensor(value) and value.dim() > 0:
                        first[key] = torch.zeros(param.shape, dtype=value.dtype, device=value.device)
                    elif torch.is_tensor(value):
                        first[key] = torch.zeros_like(value)
                    else:
                        first[key] = value
                state[name] = first
