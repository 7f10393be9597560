"""The ``zoo`` command: LightningCLI over every zoo module and datamodule.

    zoo fit --config configs/quickstart.yaml
    zoo fit --model zoo.Classifier --data datamodules.FashionMNIST --model.model zoo/convnet
    zoo fit --config data.yaml --config model.yaml --trainer.max_epochs 3
    zoo fit --config configs/pruning/vit_fmnist_gradual.yaml --checkpoint.monitor val/loss \
            --callbacks.pruning.init_args.schedule.init_args.final_sparsity 0.9

Besides LightningCLI's keys, a zoo config has ``checkpoint:`` (every run's :class:`callbacks.Checkpoint`, so
``last.ckpt`` is always the final state) and ``callbacks:``, callbacks by name, so that one argument of one
callback can be changed from the command line or by a later ``--config``. After ``fit``, ``validate`` and
``test`` the command prints a short summary of the run's metrics and where its files are.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

import callbacks  # noqa: F401  (registers the zoo's callbacks for --help and class_path short names)
import datamodules  # noqa: F401
import zoo.adapters  # noqa: F401  (the technique packages: their modules and parts become known subclasses)
import zoo.continual  # noqa: F401
import zoo.distillation  # noqa: F401
import zoo.emoe  # noqa: F401
import zoo.pruning  # noqa: F401
import zoo.quantize  # noqa: F401
import zoo.snnet  # noqa: F401
import zoo.subtuning  # noqa: F401
from callbacks.checkpoint import Checkpoint
from callbacks.run_dir import RemoveFailedRunDir
from callbacks.summary import ModelSummary
from datamodules.base import ClassificationDataModule
from zoo import reshard, runtime, sharding
from zoo.classifier import Classifier


def catalogue() -> str:
    """The zoo's modules and datamodules, for ``zoo --help``."""

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    def name(c: type) -> str:  # the short name where the package exports the class
        package = sys.modules[c.__module__.split(".")[0]]
        return f"{package.__name__}.{c.__qualname__}" if getattr(package, c.__qualname__, None) is c else f"{c.__module__}.{c.__qualname__}"

    def names(classes, packages):
        return sorted({name(c) for c in classes if c.__module__.split(".")[0] in packages and c is not ClassificationDataModule})

    models = names([Classifier, *subclasses(Classifier)], ("zoo",))
    data = names(subclasses(LightningDataModule), ("datamodules",))
    return f"Modules (--model): {', '.join(models)}. Datamodules (--data): {', '.join(data)}."


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_class_arguments(Checkpoint, "checkpoint", instantiate=True)
        parser.add_argument("--callbacks", type=dict[str, Callback] | None, default=None,
                            help="Callbacks by name: --callbacks.NAME.init_args.ARG VALUE changes one argument of one callback.")

    def _section(self, key: str) -> Any:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get(key)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer with the named callbacks, the run's ``Checkpoint`` and the zoo's model summary."""
        trainer_config = self._section("trainer") or {}
        sharding.check_accelerator(self.model, trainer_config.get("strategy"), trainer_config.get("accelerator"))
        extra = list(trainer_config.get("callbacks") or []) + list((self._section("callbacks") or {}).values())
        user_checkpoints = [c for c in extra if isinstance(c, ModelCheckpoint)]
        for c in user_checkpoints:
            if c.save_last and c.monitor and not isinstance(c, Checkpoint):
                rank_zero_warn(f"ModelCheckpoint(save_last=True, monitor={c.monitor!r}) in Lightning 2.6 rewrites last.ckpt only "
                               "on a new best; use the zoo's `checkpoint:` key (callbacks.Checkpoint) to keep the final state.")
        if trainer_config.get("enable_checkpointing", True) is not False and not user_checkpoints:
            extra.append(self._section("checkpoint"))
        if trainer_config.get("enable_model_summary", True) is not False and not any(isinstance(c, LightningModelSummary) for c in extra):
            extra.append(ModelSummary())
        extra.append(RemoveFailedRunDir())
        trainer = super().instantiate_trainer(callbacks=extra, **kwargs)
        runtime.configure_threads(processes_per_node=trainer.num_devices)
        reshard.check_checkpoint(self._section("ckpt_path"), trainer.strategy)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        config = self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config
        ckpt_path = config.get("ckpt_path")  # checked before LightningCLI reads it, so a bad file gets a clear message
        self._resume_hparams: set[str] | None = None
        self._model_args = None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in str(ckpt_path):
            saved = runtime.load_checkpoint(ckpt_path, what="--ckpt_path", mmap=True)  # only its hyperparameter names
            self._resume_hparams = set(saved.get("hyper_parameters") or {})
            self._model_args = copy.deepcopy(config.get("model"))

    def before_instantiate_classes(self) -> None:
        """Resuming: LightningCLI replaces the model's arguments by the checkpoint's hyperparameters (Lightning
        issue 20801), which leave out the optimizer and LR scheduler (they are not saved as hyperparameters), so a
        resumed run would train with the default AdamW and no schedule. Put back what the checkpoint lacks."""
        if not self._resume_hparams or self._model_args is None:
            return
        config = self.config[self.config["subcommand"]]
        before = self._model_args.get("init_args") or {}
        after = config.model.get("init_args")
        if after is None:
            return
        for key in ("optimizer", "lr_scheduler"):
            if key not in self._resume_hparams and key in before:
                after[key] = before[key]

    def after_fit(self) -> None:
        self._report("val", files=True)

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, split: str, files: bool = False) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        print("\n" + run_summary(trainer, self.model, split, files))


def run_summary(trainer: Trainer, module: Any, split: str, files: bool = False) -> str:
    """A few lines after a run: the split's metrics (for continual, the stream beside the current task),
    the checkpoints this run wrote, and where its config and logs are."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/") and v.numel() == 1}
    lines = []
    acc_matrix = getattr(module, "acc_matrix", None)
    if metrics:
        scope = ""
        if acc_matrix is not None and split == "val":
            scope = f" (current task {getattr(trainer.datamodule, 'current_task', '?')} only)"
        lines.append(f"{split}{scope}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(metrics.items())))
    if acc_matrix is not None:
        from callbacks.continual_metrics import stream_metrics

        done = int((~acc_matrix.isnan()).any(1).sum())
        if done:
            stream = stream_metrics(acc_matrix[:done, :done])
            lines.append(f"stream after {done} task(s) (test split): average accuracy {stream['avg_acc']:.4f}, "
                         f"forgetting {stream['forgetting']:.4f}, BWT {stream['bwt']:+.4f}")
    if files:
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "")
        lines.append(f"checkpoint:  {last or '(none saved)'}" + (f"   (final state, step {trainer.global_step})" if last else ""))
        best = getattr(ckpt, "best_model_path", "")
        if isinstance(ckpt, ModelCheckpoint) and ckpt.monitor and best:
            here = ckpt.dirpath and Path(best).resolve().is_relative_to(Path(ckpt.dirpath).resolve())
            score = f"{ckpt.monitor} {float(ckpt.best_model_score):.4f}" if ckpt.best_model_score is not None else ckpt.monitor
            lines.append(f"best:        {best}   ({score}{'' if here else ', from the run this one resumed'})")
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(f"config+logs: {trainer.logger.log_dir}")
            lines.append(f"tensorboard: tensorboard --logdir {trainer.logger.save_dir}")
    return "\n".join(lines)


def main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    """Entry point of the ``zoo`` console script (``args`` for calls from Python)."""
    runtime.quiet()
    return ZooCLI(
        Classifier,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
        },
        parser_kwargs={"description": f"Lightning Zoo. {catalogue()}"},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def console(args: list[str] | None = None) -> None:
    """The ``zoo`` console script: its wrapper exits with what this returns, so it returns nothing (status 0).

    A bad input prints the zoo's own message alone (exit status 2); ``ZOO_TRACEBACK=1`` shows the traceback.
    """
    try:
        main(args)
    except Exception as exc:  # noqa: BLE001  (only messages the zoo raised on purpose are shortened)
        message = None if os.environ.get("ZOO_TRACEBACK") else runtime.short_error(exc)
        if message is None:
            raise
        print(f"zoo: error: {message}\n(set ZOO_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
