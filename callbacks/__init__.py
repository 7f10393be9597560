"""Callbacks of the zoo: one purpose each, attachable to any zoo module from YAML."""

from callbacks.compression_report import CompressionReport
from callbacks.continual_metrics import ContinualMetrics
from callbacks.expert_load import ExpertLoad
from callbacks.pruning import LotteryTicket, MagnitudePruning, StructuredPruning
from callbacks.quantize import PostTrainingQuantization, QuantizationAwareTraining
from callbacks.rank_schedule import RankSchedule
from callbacks.pruning_schedules import Cubic, Exponential, Linear, OneShot, PruningSchedule
from callbacks.stitch_sweep import StitchSweep
from callbacks.skip_cached_inputs import SkipCachedInputs
from callbacks.subtuning_profile import SubTuningProfile

__all__ = [
    "CompressionReport", "ContinualMetrics", "Cubic", "ExpertLoad", "Exponential", "Linear", "LotteryTicket", "MagnitudePruning", "OneShot",
    "PostTrainingQuantization", "PruningSchedule", "QuantizationAwareTraining", "RankSchedule", "SkipCachedInputs", "StitchSweep", "StructuredPruning", "SubTuningProfile",
]
