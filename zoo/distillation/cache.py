"""Cached teacher outputs: computed once over the training split into memory-mapped ``.npy`` files, keyed by the
sample's ``index`` (``Batch.index``), reused every epoch and by later runs with the same teachers and data.

The outputs are computed on the datamodule's deterministic view of its training split (``eval_view("train")``,
the same samples and indices as its training batches), read from memory in large batches (no loader is rebuilt, see
:func:`~datamodules.tensor.eval_batches`), so nothing of the datamodule is changed. Training batches must carry
``index`` (``with_index: true`` on the datamodule); setup fails, saying so, when they do not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.tensor import eval_batches
from zoo.distillation.losses import ModelOutputs
from zoo.distillation.teachers import TeacherPool
from zoo.runtime import cache_dir as default_cache_dir

CACHE_BATCH_SIZE = 256  # samples per teacher forward while filling the cache (at least the datamodule's batch size)


class TeacherCache:
    """One teacher's outputs for every training sample in memory-mapped ``.npy`` files, one row per sample index.

    Files are opened read-only and lazily in each process, so DataLoader workers and DDP ranks share them safely.
    """

    def __init__(self, directory: Path, prefix: str, entries: dict[str, list[int]]):
        self.directory, self.prefix, self.entries = Path(directory), prefix, entries
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{self.prefix}_{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def rows(self, name: str, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array(name)[index.cpu().numpy()])).to(device)

    def outputs(self, index: torch.Tensor, device: torch.device) -> ModelOutputs:
        out = ModelOutputs(features={n: self.rows(n, index, device) for n in self.entries if n != "logits"})
        if "logits" in self.entries:
            out.logits = self.rows("logits", index, device)
        return out


def prefix_of(key: Any) -> str:
    """File prefix of a teacher: ``t<k>`` for the preset's k-th teacher, else a digest of its spec."""
    return f"t{key}" if isinstance(key, int) else "t_" + hashlib.sha1(str(key).encode()).hexdigest()[:8]


def check_datamodule(dm: Any, approximate: bool) -> None:
    """Fail before training unless ``dm`` gives a deterministic view of its training split and indexed batches."""
    name = type(dm).__name__
    if dm is None or not callable(getattr(dm, "eval_view", None)):
        raise ValueError(f"cache_teacher=true needs a datamodule with eval_view(split) (a deterministic view of its training split, as the zoo's "
                         f"datamodules have); got {name}")
    if not getattr(dm, "with_index", False):
        raise ValueError(f"cache_teacher=true reads teacher outputs by sample index, but {name}'s batches carry none: set `with_index: true` "
                         "on the datamodule (data.init_args.with_index)")
    if not getattr(dm, "deterministic_train_transform", False) and not approximate:
        raise ValueError(f"cache_teacher=true but {name}'s training transform is random (augment: true): cached teacher outputs would not match "
                         "the augmented inputs. Set augment: false, cache_teacher: false, or approximate_cache_targets: true (teacher outputs of "
                         "un-augmented inputs).")


def _entries(pool: TeacherPool) -> dict[Any, dict[str, list[int] | None]]:
    """Per teacher: the outputs to cache (``logits`` when a logit term uses it, and the requested feature layers)."""
    out: dict[Any, dict[str, Any]] = {}
    for term, keys in pool.attached.items():
        for k in keys:
            entry = out.setdefault(k, {})
            if not term.cacheable:
                raise ValueError(f"cache_teacher=true stores teacher logits and FeatureHint features only; {term.name} "
                                 f"({type(term).__name__}) needs the online teacher (its inputs vary in length). Set cache_teacher: false.")
            if term.uses_logits and pool.teachers[k].has_head:
                entry["logits"] = None
            entry.update({n: None for n in pool.teachers[k].request.layers})
    return out


def _key(pool: TeacherPool, wanted: dict, dm: Any, n: int, approximate: bool) -> str:
    digest = hashlib.sha1()
    for k in sorted(wanted, key=str):
        for name, v in pool.teachers[k].model.state_dict().items():
            digest.update(name.encode())
            digest.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    hp = {k: v for k, v in dict(getattr(dm, "hparams", {})).items() if k not in ("batch_size", "num_workers", "with_index")}
    meta = [type(dm).__qualname__, repr(sorted(hp.items())), n, [[prefix_of(k), sorted(wanted[k])] for k in sorted(wanted, key=str)], approximate]
    digest.update(json.dumps(meta, default=str).encode())
    return digest.hexdigest()[:16]


def build_cache(module: Any, pool: TeacherPool, directory: str | None, approximate: bool) -> Path:
    """Fill (or reuse) the cache of every teacher in ``pool`` and attach it; each DDP rank computes its share of the rows."""
    trainer = module.trainer
    dm = trainer.datamodule
    check_datamodule(dm, approximate)
    view = dm.eval_view("train")
    n, wanted = len(view), _entries(pool)
    root = Path(directory or default_cache_dir("teacher_cache")) / _key(pool, wanted, dm, n, approximate)
    root = Path(trainer.strategy.broadcast(str(root)))
    meta_file = root / "meta.json"
    if not trainer.strategy.broadcast(meta_file.is_file()):  # rank 0 decides, so every rank takes the same branch
        shapes = _fill(trainer, pool, wanted, view, dm, root)
        if trainer.is_global_zero:
            meta_file.write_text(json.dumps({"entries": {prefix_of(k): e for k, e in shapes.items()}, "num_samples": n}))
        trainer.strategy.barrier("teacher_cache_done")
    entries = json.loads(meta_file.read_text())["entries"]
    for k in wanted:
        pool.teachers[k].cache = TeacherCache(root, prefix_of(k), entries[prefix_of(k)])
    return root


def _batches(view: Any, dm: Any, device: Any = None, rank: int = 0, world_size: int = 1, limit: int | None = None) -> Any:
    """The view's samples read from memory in large batches (:func:`~datamodules.tensor.eval_batches`; a
    ``DataLoader`` with the datamodule's ``collate_fn`` for data that cannot gather), this rank's share."""
    return eval_batches(view, max(CACHE_BATCH_SIZE, getattr(dm, "batch_size", 1)), device, rank, world_size, limit=limit,
                        collate_fn=getattr(dm, "collate_fn", None), num_workers=getattr(dm, "num_workers", 0))


def _tensors(out: ModelOutputs, names: dict) -> dict[str, torch.Tensor]:
    return {n: (out.logits if n == "logits" else out.features[n]) for n in names}


def _shapes(pool: TeacherPool, wanted: dict, view: Any, dm: Any) -> dict[Any, dict[str, list[int]]]:
    x = next(iter(_batches(view, dm, limit=2))).inputs
    return {k: {n: list(v.shape[1:]) for n, v in _tensors(pool.teachers[k].run(x), names).items()} for k, names in wanted.items()}


def _fill(trainer: Any, pool: TeacherPool, wanted: dict, view: Any, dm: Any, root: Path) -> dict[Any, dict[str, list[int]]]:
    device, n = trainer.strategy.root_device, len(view)
    shapes = _shapes(pool, wanted, view, dm)
    if trainer.is_global_zero:
        root.mkdir(parents=True, exist_ok=True)
        for k, entry in shapes.items():
            for name, shape in entry.items():
                np.lib.format.open_memmap(root / f"{prefix_of(k)}_{name}.npy", mode="w+", dtype=np.float32, shape=(n, *shape))
    trainer.strategy.barrier("teacher_cache_created")
    arrays = {(k, name): np.load(root / f"{prefix_of(k)}_{name}.npy", mmap_mode="r+") for k, entry in shapes.items() for name in entry}
    for b in _batches(view, dm, device, trainer.global_rank, trainer.world_size):
        x, idx = b.inputs, b.require("index", by="the teacher cache").cpu().numpy()
        for k, names in wanted.items():
            for name, value in _tensors(pool.teachers[k].run(x), names).items():
                if list(value.shape[1:]) != shapes[k][name]:
                    raise ValueError(f"cache_teacher: {name} has shape {tuple(value.shape[1:])} in one batch and {tuple(shapes[k][name])} in another; "
                                     "only fixed-shape outputs can be cached (set cache_teacher: false)")
                arrays[(k, name)][idx] = value.float().cpu().numpy()
    for a in arrays.values():
        a.flush()
    del arrays
    trainer.strategy.barrier("teacher_cache_filled")
    return shapes
