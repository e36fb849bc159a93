"""Calibration of QCFS thresholds (and weights) so the spiking network reproduces the original UNet."""

from ..converter.thresholds import collect_site_inputs, init_thresholds, mse_threshold, percentile_threshold
from .calibrate import CalibrationConfig, CalibrationResult, calibrate
from .distill import DistillSettings
from .policy import calibrate_or_quantize
from .report import write_calibration_report

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "DistillSettings",
    "calibrate",
    "calibrate_or_quantize",
    "collect_site_inputs",
    "init_thresholds",
    "mse_threshold",
    "percentile_threshold",
    "write_calibration_report",
]
