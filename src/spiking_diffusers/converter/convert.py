"""``convert``: a :class:`QCFSUNet2DModel` in, an integrate-and-fire :class:`SpikingUNet2DModel` out."""

from __future__ import annotations

import copy

from .building import install_neurons, move_like
from .models import QCFSUNet2DModel, SpikingUNet2DModel
from .qcfs import set_tsm_steps
from .unit_threshold import fold_unit_thresholds


def convert(
    qnet: QCFSUNet2DModel,
    timesteps: int = 8,
    neuron: str = "if",
    nonlinear_mode: str = "compensated",
    execution: str = "batched",
    threshold_form: str = "lambda",
    time_embedding: str = "auto",
    tsm: bool | None = None,
) -> SpikingUNet2DModel:
    """Turn every QCFS unit into an IF neuron (threshold = lambda, initial membrane = phi * lambda).

    ``timesteps`` is T, the number of simulation steps per forward; ``neuron`` is "if" or "signed_if";
    GroupNorm and attention become ``nonlinear_mode`` ops ("compensated" or "per_step");
    ``threshold_form="unit"`` rescales the weights so that every threshold is 1. ``tsm`` gives every neuron
    temporal factors (SDM's TSM): those ``qnet`` was calibrated with, else factors of 1; by default TSM is
    on exactly when ``qnet`` carries factors. ``qnet`` is unchanged. Residual spikes follow ``qnet``: its
    signed input encoders (if it was quantized with ``residual_spikes=True``) become ternary IF neurons
    with their calibrated thresholds.
    """
    _check_arguments(qnet, timesteps, tsm)
    config = dict(qnet.config)
    calibrated_steps = int(config.get("tsm_steps") or 0)
    tsm = bool(calibrated_steps) if tsm is None else bool(tsm)
    if tsm and calibrated_steps and calibrated_steps != int(timesteps):
        raise ValueError(
            f"This QCFS model's temporal factors (TSM) were calibrated for T = {calibrated_steps}; convert it at "
            f"timesteps={calibrated_steps}, or pass tsm=False to drop them."
        )
    snn = SpikingUNet2DModel(
        unet_config=config["unet_config"],
        levels=config["levels"],
        phi=config["phi"],
        per_channel=config["per_channel"],
        timesteps=int(timesteps),
        neuron=neuron,
        nonlinear_mode=nonlinear_mode,
        execution=execution,
        threshold_form=threshold_form,
        time_embedding=time_embedding,
        sample_size=config["sample_size"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        tsm=tsm,
        residual_spikes=config.get("residual_spikes", False),
    )
    move_like(snn, qnet)
    converted = copy.deepcopy(qnet.unet)
    set_tsm_steps(converted, int(timesteps) if tsm else 0)
    install_neurons(converted, neuron, nonlinear_mode, time_embedding)
    snn.unet.load_state_dict(converted.state_dict())
    if threshold_form == "unit":
        fold_unit_thresholds(snn.unet)
    return snn.eval()


def _check_arguments(qnet, timesteps, tsm) -> None:
    """The model is a :class:`QCFSUNet2DModel` and ``timesteps`` an int in bounds (the model classes check the
    choices), else a ``TypeError`` / ``ValueError`` that names the argument."""
    from diffusers import UNet2DModel

    from ..validation import check_bool, check_int

    if isinstance(qnet, SpikingUNet2DModel):
        raise TypeError("convert() takes a QCFSUNet2DModel; this model is already a SpikingUNet2DModel.")
    if isinstance(qnet, UNet2DModel):
        raise TypeError(
            "convert() takes a QCFSUNet2DModel, not a plain UNet2DModel: quantize it first, "
            "convert(quantize(unet, levels=L), timesteps=T) (or calibrate() it)."
        )
    if not isinstance(qnet, QCFSUNet2DModel):
        raise TypeError(
            f"convert() takes a QCFSUNet2DModel (from quantize() or calibrate()), got {type(qnet).__name__}."
        )
    check_int(timesteps, "timesteps", "timesteps")
    if tsm is not None:
        check_bool(tsm, "tsm")
