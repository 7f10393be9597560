"""Moved: the profile's parts are in :mod:`zoo.subtuning.profile`, the callback in :mod:`callbacks.subtuning_profile`.

A shim for imports that still name this module (``callbacks/__init__.py``); delete it once they are updated.
"""

from callbacks.subtuning_profile import SubTuningProfile
from zoo.subtuning.profile import FULL, ProfileRunner, greedy_select, profile_figure, stack_dataset, write_outputs

__all__ = ["FULL", "ProfileRunner", "SubTuningProfile", "greedy_select", "profile_figure", "stack_dataset", "write_outputs"]
