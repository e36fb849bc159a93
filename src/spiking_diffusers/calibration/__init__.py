"""Calibration of QCFS thresholds (and weights) so the spiking network reproduces the original UNet."""

from .calibrate import CalibrationConfig, CalibrationResult, calibrate
from .distill import DistillSettings
from .report import save_calibration
from .statistics import collect_site_inputs, init_thresholds, mse_threshold, percentile_threshold

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "DistillSettings",
    "calibrate",
    "collect_site_inputs",
    "init_thresholds",
    "mse_threshold",
    "percentile_threshold",
    "save_calibration",
]
