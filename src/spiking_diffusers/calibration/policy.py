"""The policy that turns a loaded model into the QCFS network the commands convert.

:func:`qcfs_network` is the one path every command takes from whatever it loaded (an ANN, a QCFS model, a
spiking model) to the QCFS network it converts, and says what it did. An uncalibrated ANN goes through
:func:`calibrate_or_quantize`: calibrated with the same recipe as ``sdm-calibrate``, or (quick, poor) with
percentile thresholds only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

from ..converter import QCFSUNet2DModel, SpikingUNet2DModel, quantize
from ..label_tokens import LabelTokens
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
    threshold_groups: int | None = None,
    offsets: bool | None = None,
    label_tokens: LabelTokens | None = None,
    output_precision: int | None = None,
) -> CalibrationResult:
    """The QCFS network that the commands convert when they are given an uncalibrated ANN, with the
    calibration report (``{}`` when only the percentile init ran).

    With ``calibration`` (a :class:`CalibrationConfig`, whose T, L, per-channel choice and seed are
    overridden by the arguments here), the full calibration of ``sdm-calibrate`` runs; without it,
    thresholds are the 99.9th percentile of each site's input on noised probes: quick, and a poor network
    (see the calibration benchmark). ``residual_spikes`` puts signed input encoders on the residual-reading
    convolutions and attention projections (``None``: as ``calibration`` says, else no). ``threshold_groups``
    is K, the timestep-aware thresholds per site (``None``: as ``calibration`` says, else 1); ``offsets`` gives
    the activation units an input shift and an output offset (``None``: as ``calibration`` says, else no).
    ``label_tokens`` condition a label-conditional cross-attention UNet's calibration. ``output_precision`` is
    the output activation's multiple of the levels (``None``: as ``calibration`` says, else 1).
    """
    if residual_spikes is None:
        residual_spikes = calibration.residual_spikes if calibration else False
    if threshold_groups is None:
        threshold_groups = calibration.threshold_groups if calibration else 1
    if offsets is None:
        offsets = calibration.offsets if calibration else False
    if output_precision is None:
        output_precision = calibration.output_precision if calibration else 1
    if calibration is None:
        qnet = quantize(
            unet,
            levels=levels,
            per_channel=per_channel,
            init="percentile",
            seed=seed,
            residual_spikes=residual_spikes,
            threshold_groups=threshold_groups,
            offsets=offsets,
            output_precision=output_precision,
        )
        return CalibrationResult(qnet, {})
    config = dataclasses.replace(
        calibration,
        timesteps=timesteps or levels,
        levels=levels,
        per_channel=per_channel,
        seed=seed,
        residual_spikes=residual_spikes,
        threshold_groups=threshold_groups,
        offsets=offsets,
        output_precision=output_precision,
    )
    scheduler_config = scheduler_config or dict(DDPMScheduler().config)
    return calibrate(unet, scheduler_config, config, progress=progress, label_tokens=label_tokens)


def default_levels(timesteps: int, calibration: CalibrationConfig | None) -> int:
    """L for an ANN when none is asked for: B x T of the calibration recipe, T without calibration."""
    if calibration is None:
        return timesteps
    return dataclasses.replace(calibration, timesteps=timesteps, levels=None).resolved_levels


class ConversionSourceError(ValueError):
    """The model given cannot become the QCFS network asked for (a setting conflicts with the model's own)."""


@dataclasses.dataclass
class QCFSSource:
    """The QCFS network a command converts, where it came from, and what was done to get it.

    ``description`` is the one line every command prints ("what it converted"); ``ann`` is the original
    network when it is at hand (else ``None``: the QCFS network's ``as_ann()`` stands in for it);
    ``calibration_report`` is the report of a calibration run here (``{}`` when none ran).
    """

    qnet: QCFSUNet2DModel
    ann: UNet2DModel | None
    description: str
    calibration_report: dict[str, Any]


def qcfs_network(
    unet: UNet2DModel | QCFSUNet2DModel | SpikingUNet2DModel,
    scheduler_config: dict[str, Any] | None,
    timesteps: int,
    levels: int | None = None,
    per_channel: bool | None = None,
    seed: int = 0,
    calibration: CalibrationConfig | None = None,
    residual_spikes: bool | None = None,
    progress: bool = True,
    threshold_groups: int | None = None,
    offsets: bool | None = None,
    label_tokens: LabelTokens | None = None,
    output_precision: int | None = None,
) -> QCFSSource:
    """The one path from a loaded UNet to the QCFS network that every command converts.

    - an original ``UNet2DModel`` is calibrated with ``calibration`` (the ``sdm-calibrate`` recipe at T =
      ``timesteps``, L = ``levels`` or T), or, with ``calibration=None``, gets percentile thresholds only;
    - a ``QCFSUNet2DModel`` (calibrated or not) is taken as it is;
    - a ``SpikingUNet2DModel`` (lambda form) maps back onto the QCFS network it was converted from.

    ``levels``, ``per_channel``, ``residual_spikes``, ``threshold_groups`` and ``offsets`` that conflict with a QCFS or
    spiking model's own raise :class:`ConversionSourceError`; ``None`` means "as the model has it" (for an
    ANN: L = T, per-layer thresholds unless ``calibration`` says per channel, no residual spikes, K as
    ``calibration`` says or 1). ``label_tokens`` condition a label-conditional UNet's calibration.
    """
    if isinstance(unet, SpikingUNet2DModel | QCFSUNet2DModel):
        qnet = unet.to_qcfs() if isinstance(unet, SpikingUNet2DModel) else unet
        own = qnet.config
        for name, requested, value in (
            ("levels", levels, own.levels),
            ("per_channel", per_channel, own.per_channel),
            ("residual_spikes", residual_spikes, bool(own.residual_spikes)),
            ("threshold_groups", threshold_groups, int(own.get("threshold_groups") or 1)),
            ("offsets", offsets, bool(own.get("offsets", False))),
            ("output_precision", output_precision, int(own.get("output_precision") or 1)),
        ):
            if requested is not None and requested != value:
                raise ConversionSourceError(f"{name}={requested} conflicts with the model's own {name}={value}.")
        kind = "spiking model (its QCFS network)" if isinstance(unet, SpikingUNet2DModel) else "QCFS model"
        return QCFSSource(qnet, None, f"a {kind} with L = {own.levels}, thresholds as given", {})
    if calibration is not None and per_channel is None:
        per_channel = calibration.per_channel
    result = calibrate_or_quantize(
        unet,
        levels=levels or default_levels(timesteps, calibration),
        per_channel=bool(per_channel),
        seed=seed,
        timesteps=timesteps,
        scheduler_config=scheduler_config,
        calibration=calibration,
        progress=progress,
        residual_spikes=residual_spikes,
        threshold_groups=threshold_groups,
        offsets=offsets,
        label_tokens=label_tokens,
        output_precision=output_precision,
    )
    level = result.qnet.config.levels
    if calibration is None:
        how = (
            f"an uncalibrated ANN with L = {level}, thresholds the 99.9th percentile on noised inputs (not calibrated)"
        )
    else:
        how = f"an uncalibrated ANN, calibrated here with the sdm-calibrate recipe at T = {timesteps}, L = {level}"
    return QCFSSource(result.qnet, unet, how, result.report)
