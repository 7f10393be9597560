"""Move a run between sharded and unsharded strategies: one conversion of its checkpoint, then ``--ckpt_path``.

A sharded run (``ModelParallelStrategy``, FSDP2) saves a distributed-checkpoint folder, or one file whose optimizer
states are numbered in the module's parameter order; it reads a file only whole, and numbered states by that order.
The other strategies (one device, DDP) read files only (a sharded run's single file too: torch matches states by the
optimizer groups' order), number optimizer states in the optimizer groups' order (``optimizer.state_dict()``), and
adapters save there only what was trained (:mod:`zoo.adapters.checkpoint`). So a sharded run's folder does not
resume unsharded, nor an unsharded run's file sharded, as they are (Lightning fails deep inside, on a directory, a
missing key or a shape). ``--to sharded`` keys the optimizer states by parameter name, which the sharded loader reads
whatever the order; :class:`~zoo.classifier.Classifier` saves unsharded runs that way (:func:`name_optimizer_states`),
so only older unsharded files, trained-only adapter files and sharded folders need converting. :func:`convert` writes one file in
the other layout; the ``zoo`` command refuses a checkpoint of the wrong layout before training
(:func:`check_checkpoint`), naming the command::

    python -m zoo.reshard runs/.../last.ckpt runs/.../last_sharded.ckpt --to sharded   # then resume sharded
    python -m zoo.reshard runs/.../last.ckpt runs/.../last_plain.ckpt --to plain       # a sharded run's folder, for
                                                                                       # one device / DDP / `zoo test`
Everything else in the checkpoint (loops, schedulers, callbacks, hyperparameters) is copied as saved.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from zoo import runtime

LAYOUTS = ("sharded", "plain")
SPECIAL = ("last", "best", "hpc", "registry")  # Lightning's ckpt_path names, resolved by the Trainer


def optimizer_layout(checkpoint: dict) -> str | None:
    """``"sharded"`` (optimizer states keyed by parameter name), ``"plain"`` (by position) or None (no optimizer)."""
    for state in checkpoint.get("optimizer_states") or []:
        params = [p for group in state.get("param_groups", []) for p in group.get("params", [])]
        if params:
            return "sharded" if isinstance(params[0], str) else "plain"
    return None


def _to_plain(state: dict) -> dict:
    """A name-keyed optimizer state dict keyed by position (positions run over the groups' parameters in order)."""
    position = {name: i for i, name in enumerate(p for group in state["param_groups"] for p in group["params"])}
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [position[p] for p in group["params"]]} for group in state["param_groups"]]}


def _to_sharded(state: dict, names: list[str]) -> dict:
    """A position-keyed optimizer state dict keyed by parameter name (``names[i]``: the name of position ``i``)."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]}


def _group_names(module: Any, optimizer: Any) -> list[str] | None:
    """The name of each of ``optimizer``'s parameters in its groups' order (torch's positions); None if one is not
    ``module``'s."""
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [names[id(p)] for p in params] if all(id(p) in names for p in params) else None


def name_optimizer_states(checkpoint: dict, module: Any, optimizers: list) -> None:
    """Key the position-keyed optimizer states of an unsharded run's ``checkpoint`` by parameter name, in place (what
    :class:`~zoo.classifier.Classifier` saves): the sharded loader reads names whatever their order, and torch's
    ``Optimizer.load_state_dict`` matches them by the groups' order, so the file resumes under either kind of strategy."""
    states = checkpoint.get("optimizer_states") or []
    for i, (state, optimizer) in enumerate(zip(states, optimizers)):
        positions = [p for g in state.get("param_groups", []) for p in g.get("params", [])]
        names = _group_names(module, optimizer)
        if positions and all(isinstance(p, int) for p in positions) and names is not None and len(positions) == len(names):
            states[i] = _to_sharded(state, names)


def _position_names(module: Any, checkpoint: dict) -> list[list[str]]:
    """Per optimizer, the parameter name of each position: the module's own parameter groups (its
    ``configure_optimizers``), checked against the saved groups' sizes."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    optimizers = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    optimizers = [o["optimizer"] if isinstance(o, dict) else o for o in optimizers]
    out = []
    for optimizer, saved in zip(optimizers, checkpoint["optimizer_states"]):
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if sizes != [len(g["params"]) for g in saved["param_groups"]]:
            raise ValueError(f"the checkpoint's optimizer groups hold {[len(g['params']) for g in saved['param_groups']]} "
                             f"parameters, {type(module).__name__}'s own groups {sizes}: cannot name its positions")
        names = _group_names(module, optimizer)
        if names is None:
            raise ValueError(f"{type(module).__name__}'s optimizer holds a parameter that is not the module's: cannot name its positions")
        out.append(names)
    return out


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, seed: int | None = None) -> Path:
    """Write checkpoint ``src`` (a file or a sharded run's folder) to the file ``dst`` in the ``to`` layout: whole
    weights (a trained-only adapter state made whole, its base rebuilt from the module's hyperparameters, after
    ``seed_everything(seed)`` for a base that is not pretrained) and the optimizer states keyed as that layout keys them."""
    from zoo.adapters.checkpoint import fill_base, holds_trained_only

    if to not in LAYOUTS:
        raise ValueError(f"to={to!r}: expected one of {LAYOUTS}")
    checkpoint = runtime.load_checkpoint(src, what="the checkpoint to convert", optimizers=True)
    layout, module = optimizer_layout(checkpoint), None
    if holds_trained_only(checkpoint["state_dict"]) or (to == "sharded" and layout == "plain"):
        from lightning.pytorch import seed_everything

        from zoo.backbones import load_zoo_module

        if seed is not None:
            seed_everything(seed, verbose=False)
        try:
            module = load_zoo_module(src)  # whole weights (a different base fails here, as a resume would)
        except RuntimeError as exc:
            if "different base model" not in str(exc):
                raise
            hint = "" if seed is not None else " (for a base that is not pretrained, give the run's --seed)"
            raise ValueError(f"{src}: the adapter run's base, rebuilt from the module's hyperparameters, differs from the one it "
                             f"trained on{hint}") from exc
        fill_base(module, checkpoint["state_dict"], what=str(src))
    states = checkpoint.get("optimizer_states") or []
    if states and layout != to:
        if to == "plain":
            checkpoint["optimizer_states"] = [_to_plain(s) for s in states]
        else:
            checkpoint["optimizer_states"] = [_to_sharded(s, names) for s, names in zip(states, _position_names(module, checkpoint))]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, dst)
    return dst


def check_checkpoint(ckpt_path: Any, strategy: Any) -> None:
    """Refuse, before training, a checkpoint the strategy cannot read: under ``ModelParallelStrategy`` a trained-only
    file, elsewhere a sharded run's folder. The message names the file and the :func:`convert` command. (A position-keyed
    file from before :func:`name_optimizer_states` is not told apart from a sharded run's consolidated file, which is
    numbered too, in another order: convert such a file before resuming it sharded.)"""
    from zoo.adapters.checkpoint import holds_trained_only

    if not ckpt_path or str(ckpt_path) in SPECIAL or "://" in str(ckpt_path):
        return
    sharded = type(strategy).__name__ == "ModelParallelStrategy"
    if runtime.is_distributed_checkpoint(ckpt_path):
        problem = None if sharded else "is a sharded run's checkpoint folder, which only ModelParallelStrategy reads"
    else:
        saved = runtime.load_checkpoint(ckpt_path, what="--ckpt_path", mmap=True) if sharded else {}
        problem = None
        if sharded and holds_trained_only(saved.get("state_dict") or {}):
            problem = "holds only the trained parameters of an adapter run, and ModelParallelStrategy reads a file only whole"
    if problem:
        to = "sharded" if sharded else "plain"
        out = Path(str(ckpt_path).rstrip("/"))
        out = out.with_name(f"{out.stem}_{to}.ckpt")
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r} {problem}. Convert it once, `python -m zoo.reshard {ckpt_path} {out} "
                         f"--to {to}` (add `--seed <the run's seed_everything>` for an adapter run on a base that is not "
                         "pretrained), and use that file.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a zoo checkpoint between the sharded and the unsharded layout.")
    parser.add_argument("src", help="a checkpoint file, or a sharded run's checkpoint folder")
    parser.add_argument("dst", help="the converted checkpoint file")
    parser.add_argument("--to", choices=LAYOUTS, required=True, help="sharded: to resume under ModelParallelStrategy; "
                                                                     "plain: for one device, DDP, `zoo test`")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed_everything (an adapter run's base that is not pretrained)")
    args = parser.parse_args(argv)
    runtime.quiet()
    print(convert(args.src, args.dst, args.to, args.seed))


if __name__ == "__main__":
    main()
