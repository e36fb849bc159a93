"""Sampling with spiking UNets: the diffusers pipeline, T schedules and threshold guidance."""

from .schedulers import SCHEDULERS, check_steps, make_scheduler
from .spiking_pipeline import SpikingDiffusionPipeline, step_accepts
from .t_schedule import SCHEDULE_FORM, TSchedule, TScheduleError
from .threshold_guidance import (
    GROUPS,
    ThresholdScale,
    get_threshold_scales,
    scaled_thresholds,
    set_threshold_scale,
    site_group,
)

__all__ = [
    "GROUPS",
    "SCHEDULERS",
    "SCHEDULE_FORM",
    "SpikingDiffusionPipeline",
    "TSchedule",
    "TScheduleError",
    "ThresholdScale",
    "check_steps",
    "get_threshold_scales",
    "make_scheduler",
    "scaled_thresholds",
    "set_threshold_scale",
    "site_group",
    "step_accepts",
]
