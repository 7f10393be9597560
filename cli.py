"""The ``zoo`` command: LightningCLI over every zoo module and datamodule.

    zoo fit --config configs/quickstart.yaml
    zoo fit --model zoo.Classifier --data datamodules.FashionMNIST --model.model zoo/convnet
    zoo fit --config data.yaml --config model.yaml --trainer.max_epochs 3
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import callbacks  # noqa: F401  (registers the zoo's callbacks for --help and class_path short names)
import datamodules  # noqa: F401
import zoo  # noqa: F401
from datamodules.base import ClassificationDataModule
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

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "")
        print(f"\ncheckpoint:  {best or '(none saved)'}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"config+logs: {trainer.logger.log_dir}")
            print(f"tensorboard: tensorboard --logdir {trainer.logger.save_dir}")


def main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    """Entry point of the ``zoo`` console script (``args`` for calls from Python)."""
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


def console() -> None:
    """The ``zoo`` console script: its wrapper exits with what this returns, so it returns nothing (status 0)."""
    main()


if __name__ == "__main__":
    console()
