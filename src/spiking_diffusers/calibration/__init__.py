"""Calibration of QCFS thresholds (and weights) so the spiking network reproduces the original UNet."""

from .statistics import collect_site_inputs, init_thresholds, mse_threshold, percentile_threshold

__all__ = ["collect_site_inputs", "init_thresholds", "mse_threshold", "percentile_threshold"]
