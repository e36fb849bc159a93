"""The conversion workflow behind ``sdm-convert``, as library functions: get a QCFS network from an ANN,
describe what the conversion did, and measure how closely the spiking network follows the original.

:func:`calibrate_or_quantize` (and :func:`prepare_qcfs`, the same without the report) is the single place
where an uncalibrated ANN becomes a QCFS network: calibrated with the same recipe as ``sdm-calibrate``, or
(quick, poor) with percentile thresholds only.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from ..calibration.calibrate import CalibrationConfig, CalibrationResult, calibrate
from ..converter import QCFSUNet2DModel, SpikingUNet2DModel, TemporalOp, quantize
from ..converter.building import spatial_size
from ..converter.encoders import SignedIFNeuron
from ..converter.neurons import IFNeuron
from ..converter.quantize import conditioning_kwargs
from ..converter.sites import site_wiring
from ..errors import check_finite
from ..metrics import relative_error

SITE_KINDS = ("spatial IF", "time-embedding IF", "analog QCFS", "ternary IF encoder")
"""The kinds of site a conversion summary counts; the encoders (residual spikes) only when present."""

FIDELITY_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)
"""Where the fidelity check probes the schedule: t = 50, 250, 500, 750, 950 of 1000 training steps."""


def prepare_qcfs(
    unet: UNet2DModel,
    levels: int,
    per_channel: bool = False,
    seed: int = 0,
    timesteps: int | None = None,
    scheduler_config: dict[str, Any] | None = None,
    calibration: CalibrationConfig | None = None,
    progress: bool = True,
    residual_spikes: bool | None = None,
) -> QCFSUNet2DModel:
    """The QCFS network that the commands convert when they are given an uncalibrated ANN.

    With ``calibration`` (a :class:`~spiking_diffusers.calibration.CalibrationConfig`, whose T, L,
    per-channel choice and seed are overridden by the arguments here), the full calibration of
    ``sdm-calibrate`` runs; without it, thresholds are the 99.9th percentile of each site's input on
    noised probes: quick, and a poor network (see the calibration benchmark). ``residual_spikes`` puts
    signed input encoders on the residual-reading convolutions and attention projections (``None``: as
    ``calibration`` says, else no).
    """
    return calibrate_or_quantize(
        unet, levels, per_channel, seed, timesteps, scheduler_config, calibration, progress, residual_spikes
    ).qnet


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
) -> CalibrationResult:
    """:func:`prepare_qcfs` with the calibration report (``{}`` when only the percentile init ran)."""
    if residual_spikes is None:
        residual_spikes = calibration.residual_spikes if calibration else False
    if calibration is None:
        qnet = quantize(
            unet, levels=levels, per_channel=per_channel, init="percentile", seed=seed, residual_spikes=residual_spikes
        )
        return CalibrationResult(qnet, {})
    config = dataclasses.replace(
        calibration,
        timesteps=timesteps or levels,
        levels=levels,
        per_channel=per_channel,
        seed=seed,
        residual_spikes=residual_spikes,
    )
    scheduler_config = scheduler_config or dict(DDPMScheduler().config)
    return calibrate(unet, scheduler_config, config, progress=progress)


def conversion_summary(qnet: QCFSUNet2DModel, snn: SpikingUNet2DModel) -> dict[str, Any]:
    """What the conversion did: sites by kind, the range of the thresholds lambda, and the real-valued ops.

    Residual input encoders, where there are any, are counted as ``"ternary IF encoder"`` sites."""
    wiring = site_wiring(snn.unet)
    kinds = Counter()
    for name, unit in snn.sites().items():
        if isinstance(unit, SignedIFNeuron):
            kinds["ternary IF encoder"] += 1
        elif isinstance(unit, IFNeuron):
            kinds["time-embedding IF" if wiring[name][1].kind == "temb" else "spatial IF"] += 1
        else:
            kinds["analog QCFS"] += 1
    lambdas = torch.cat([value.flatten().float().cpu() for value in qnet.thresholds().values()]).tolist()
    ops = Counter(type(module.op).__name__ for module in snn.unet.modules() if isinstance(module, TemporalOp))
    return {
        "sites": {kind: kinds[kind] for kind in SITE_KINDS if kind in kinds or kind in SITE_KINDS[:3]},
        "thresholds": {
            "min": min(lambdas),
            "median": statistics.median(lambdas),
            "max": max(lambdas),
            "count": len(lambdas),
            "per_channel": bool(qnet.config.per_channel),
        },
        "nonlinear_ops": dict(sorted(ops.items())),
        "nonlinear_mode": snn.config.nonlinear_mode,
        "tsm": _tsm_summary(snn),
    }


def _tsm_summary(snn: SpikingUNet2DModel) -> dict[str, Any]:
    """Whether the neurons carry temporal factors (TSM), and the range of those factors per time step."""
    factors = [
        n.temporal_factors.detach().float().cpu() for n in snn.neurons().values() if n.temporal_factors is not None
    ]
    if not factors:
        return {"enabled": False}
    stacked = torch.stack(factors)
    return {"enabled": True, "min_per_step": stacked.amin(0).tolist(), "max_per_step": stacked.amax(0).tolist()}


@torch.no_grad()
def noise_prediction_errors(
    snn: SpikingUNet2DModel,
    qnet: QCFSUNet2DModel,
    scheduler_config: dict[str, Any],
    ann: UNet2DModel | None = None,
    num_samples: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Relative error ``||eps - eps_ann|| / ||eps_ann||`` of the QCFS and the spiking noise prediction.

    The inputs are ``num_samples`` fixed-seed images (smooth random patterns in [-1, 1]) noised by the
    model's own schedule at the :data:`FIDELITY_FRACTIONS` of its training steps. The reference is
    ``ann``, or, when the original is not at hand (a calibrated QCFS model), ``qnet`` with its original
    activations (``as_ann``).
    """
    param = next(snn.parameters())
    config = qnet.config.unet_config
    noise_schedule = DDPMScheduler.from_config(scheduler_config)
    train_steps = noise_schedule.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    height, width = spatial_size(config.get("sample_size") or 32)
    coarse = torch.rand(
        num_samples, config["in_channels"], max(height // 4, 1), max(width // 4, 1), generator=generator
    )
    x0 = torch.nn.functional.interpolate(coarse * 2 - 1, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.randn(x0.shape, generator=generator)
    kwargs = {
        key: value.to(param.device, param.dtype) if value.is_floating_point() else value.to(param.device)
        for key, value in conditioning_kwargs(config, num_samples, generator).items()
    }

    rows = []
    for fraction in tqdm(FIDELITY_FRACTIONS, desc="fidelity check", disable=not progress, leave=False):
        t = torch.full((num_samples,), min(round(fraction * train_steps), train_steps - 1), dtype=torch.long)
        sample = noise_schedule.add_noise(x0, noise, t).to(param.device, param.dtype)
        t = t.to(param.device)
        if ann is not None:
            reference = ann(sample, t, **kwargs).sample
        else:
            with qnet.as_ann():
                reference = qnet(sample, t, **kwargs).sample
        outputs = {
            "original": reference,
            "QCFS": qnet(sample, t, **kwargs).sample,
            "spiking": snn(sample, t, **kwargs).sample,
        }
        for name, output in outputs.items():
            check_finite(
                output,
                f"The {name} network's noise prediction at t = {int(t[0])}",
                "its weights or thresholds overflow; check the model.",
            )
        rows.append(
            {
                "t": int(t[0]),
                "qcfs_vs_ann": relative_error(outputs["QCFS"], reference),
                "snn_vs_ann": relative_error(outputs["spiking"], reference),
            }
        )
    return rows
