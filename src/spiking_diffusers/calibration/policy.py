"""The policy that turns a loaded, uncalibrated ANN into the QCFS network the commands convert.

:func:`calibrate_or_quantize` is the single place where that happens: calibrated with the same recipe as
``sdm-calibrate``, or (quick, poor) with percentile thresholds only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

from ..converter import quantize
from .calibrate import CalibrationConfig, CalibrationResult, calibrate


def calibrate_or_quantize(
    unet: UNet2DModel,
    levels: int,
    per_channel: bool = False,
    seed: int = 0,
    timesteps: int | None = None,
    scheduler_config: dict[str, Any] | None = None,
    calibration: CalibrationConfig | None = None,
    progress: bool = True,
    residual_spikes: bool | None = None,
    offsets: bool | None = None,
) -> CalibrationResult:
    """The QCFS network that the commands convert when they are given an uncalibrated ANN, with the
    calibration report (``{}`` when only the percentile init ran).

    With ``calibration`` (a :class:`CalibrationConfig`, whose T, L, per-channel choice and seed are
    overridden by the arguments here), the full calibration of ``sdm-calibrate`` runs; without it,
    thresholds are the 99.9th percentile of each site's input on noised probes: quick, and a poor network
    (see the calibration benchmark). ``residual_spikes`` puts signed input encoders on the residual-reading
    convolutions and attention projections (``None``: as ``calibration`` says, else no); ``offsets`` gives the
    activation units an input shift and an output offset (the same).
    """
    if residual_spikes is None:
        residual_spikes = calibration.residual_spikes if calibration else False
    if offsets is None:
        offsets = calibration.offsets if calibration else False
    if calibration is None:
        qnet = quantize(
            unet,
            levels=levels,
            per_channel=per_channel,
            init="percentile",
            seed=seed,
            residual_spikes=residual_spikes,
            offsets=offsets,
        )
        return CalibrationResult(qnet, {})
    config = dataclasses.replace(
        calibration,
        timesteps=timesteps or levels,
        levels=levels,
        per_channel=per_channel,
        seed=seed,
        residual_spikes=residual_spikes,
        offsets=offsets,
    )
    scheduler_config = scheduler_config or dict(DDPMScheduler().config)
    return calibrate(unet, scheduler_config, config, progress=progress)
