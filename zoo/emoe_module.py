"""Old import path of :class:`zoo.emoe.EMoEModule` (kept for zoo/__init__.py, old YAML and checkpoints' ``zoo_class``)."""

from zoo.emoe import EMoEModule

__all__ = ["EMoEModule"]
