"""Process-wide defaults of the ``zoo`` command: CPU threads, warnings nobody can act on, short error messages.

- **Threads.** PyTorch takes every core it sees; on a shared or small machine, or with several DDP processes
  on one node, the processes then fight over cores and runs get 5-10x slower. :func:`configure_threads`
  gives each process its share: ``cores // processes_per_node``, less the cores other programs keep busy
  (the 1-minute load average), at least 1. ``OMP_NUM_THREADS`` or ``ZOO_NUM_THREADS`` set by the user win.
- **Warnings.** :func:`quiet` hides the ones a zoo user cannot act on (Lightning's litlogger/litmodels tips,
  its ``_pytree`` deprecation, "module(s) in eval mode" for frozen teachers and BatchNorm, its note that the module's
  own ``transfer_batch_to_device`` is used (the zoo's, on purpose), torch's notes on torchao registering Enums,
  bitsandbytes' missing optional 4-bit CPU kernel when peft imports it).
- **Errors.** :func:`short_error` finds the zoo's own message inside jsonargparse's and Lightning's wrapping,
  so the command prints it alone; ``ZOO_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = tuple(str(ROOT / p) for p in ("zoo", "datamodules", "callbacks", "cli.py"))
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ModuleNotFoundError)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads(processes_per_node: int = 1, cores: int | None = None, load: float | None = None) -> int:
    """Each process's share of the idle cores: ``(cores - busy) // processes``, at least 1."""
    cores = available_cores() if cores is None else cores
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, cores - int(load + 0.5))
    return max(1, idle // max(1, processes_per_node))


_USER_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")  # as the process started: later values may be our own export


def configure_threads(processes_per_node: int = 1) -> int:
    """Set ``torch``'s intra-op threads for this process (see the module docstring); returns the number."""
    import torch

    explicit = os.environ.get("ZOO_NUM_THREADS") or _USER_OMP_THREADS
    threads = int(explicit) if explicit else default_threads(processes_per_node)
    if threads < 1:
        raise ValueError(f"ZOO_NUM_THREADS / OMP_NUM_THREADS = {explicit!r}: expected a positive integer")
    torch.set_num_threads(threads)
    if not _USER_OMP_THREADS:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # DDP workers started later inherit this process's share
    return threads


# logger -> the start of a message it logs that a zoo user cannot act on (a library's note to other libraries)
LIBRARY_NOTES = {
    "torch.utils._pytree": "%s is an Enum subclass and is now natively supported",  # torchao's register_constant calls
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",  # an optional kernel package, at peft's import
}


class _DropNote(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "💡 Tip" not in message and "Skipping setting a default `ModelSummary`" not in message


def quiet() -> None:
    """Hide warnings and tips that a zoo user cannot act on (see the module docstring)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):  # once, however often the CLI is built
            logger.addFilter(_DropTips())
    for name, start in LIBRARY_NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNote) for f in logger.filters):
            logger.addFilter(_DropNote(start))


def _own_frame(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(OWN_PACKAGES)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def short_error(exc: BaseException) -> str | None:
    """The zoo's own message for a bad input hidden in ``exc`` (or its causes); ``None`` for anything else."""
    for e in _chain(exc):
        if isinstance(e, USER_ERRORS) and _own_frame(e):
            return f"{type(e).__name__}: {e}"
    text = str(exc)
    if "Does not validate against any of the Union subtypes" in text:  # jsonargparse's wrapping of an __init__ error
        errors = [m.strip() for m in re.findall(r"^\s+- (.+)$", text, flags=re.MULTILINE)]
        errors = [m for m in errors if not m.startswith("Expected a <class 'NoneType'>")]
        if errors:
            return "\n".join(errors)
    return None


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` as a ``Path`` if it is a non-empty file; else a ``FileNotFoundError``/``ValueError`` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        near = sorted(str(p) for p in path.parent.glob("*.ckpt"))[:5] if path.parent.is_dir() else []
        hint = f" Checkpoints in {path.parent}: {', '.join(near)}." if near else ""
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.{hint}")
    if not path.is_file():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (0 bytes): the run that wrote it was probably killed while "
                         "saving. Use an earlier checkpoint of that run (the zoo writes last.ckpt atomically, so its "
                         "last.ckpt is whole).")
    return path


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the folder a sharded run saves (``ModelParallelStrategy``/``FSDPStrategy``'s default):
    torch.distributed.checkpoint shards plus Lightning's ``meta.pt`` (everything but the weights and optimizer)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def load_distributed_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint",
                                optimizers: bool = False) -> dict:
    """A sharded run's checkpoint folder as one checkpoint dict, on one process without a process group: Lightning's
    ``meta.pt`` with ``state_dict`` (whole tensors, the LightningModule's keys) read from the shards; with
    ``optimizers`` also ``optimizer_states`` (whole tensors, keyed by parameter name, as a consolidated file holds
    them; :mod:`zoo.reshard`). Otherwise they stay in the folder (resumed by the strategy: ``--ckpt_path <folder>``)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path).expanduser()
    try:
        checkpoint = torch.load(path / "meta.pt", map_location=map_location, weights_only=False)
        loaded: dict = {}
        # as torch.distributed.checkpoint.format_utils.dcp_to_torch_save (this process only), the weights only
        keys = None if optimizers else {"state_dict"}
        _load_state_dict(loaded, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    except Exception as exc:
        raise ValueError(f"{what} {str(path)!r} is a distributed checkpoint folder that cannot be read "
                         f"({type(exc).__name__}: {exc})") from exc
    checkpoint["state_dict"] = {k: v.to(map_location) if map_location is not None else v for k, v in loaded["state_dict"].items()}
    if optimizers:
        count = sum(1 for k in loaded if k.startswith("optimizer_"))
        checkpoint["optimizer_states"] = [loaded[f"optimizer_{i}"] for i in range(count)]
    return checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint", mmap: bool = False,
                    optimizers: bool = False) -> dict:
    """``torch.load`` of a checkpoint file with a clear message for a missing, empty or truncated file
    (``mmap``: tensors are read only when used, for callers that need a few entries). A sharded run's
    distributed-checkpoint folder loads too (:func:`load_distributed_checkpoint`)."""
    import pickle
    import zipfile

    import torch

    if is_distributed_checkpoint(path):
        return load_distributed_checkpoint(path, map_location, what, optimizers)
    path = check_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError) as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); the file is "
                         "truncated or not a PyTorch checkpoint") from exc


def cache_dir(name: str) -> Path:
    """``$ZOO_CACHE_DIR/name`` (default ``$XDG_CACHE_HOME/lightning-zoo`` or ``~/.cache/lightning-zoo``): data a run
    may reuse from an earlier one (e.g. teacher outputs); never inside the repository or a run folder."""
    root = os.environ.get("ZOO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning-zoo"
    return Path(root).expanduser() / name
