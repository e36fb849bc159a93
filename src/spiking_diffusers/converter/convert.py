"""``convert``: a :class:`QCFSUNet2DModel` in, an integrate-and-fire :class:`SpikingUNet2DModel` out."""

from __future__ import annotations

import copy

from .building import install_neurons, move_like
from .models import QCFSUNet2DModel, SpikingUNet2DModel
from .unit_threshold import fold_unit_thresholds


def convert(
    qnet: QCFSUNet2DModel,
    timesteps: int = 8,
    neuron: str = "if",
    nonlinear_mode: str = "compensated",
    execution: str = "batched",
    threshold_form: str = "lambda",
    time_embedding: str = "auto",
) -> SpikingUNet2DModel:
    """Turn every QCFS unit into an IF neuron (threshold = lambda, initial membrane = phi * lambda).

    ``timesteps`` is T, the number of simulation steps per forward; ``neuron`` is "if" or "signed_if";
    GroupNorm and attention become ``nonlinear_mode`` ops ("compensated" or "per_step");
    ``threshold_form="unit"`` rescales the weights so that every threshold is 1. ``qnet`` is unchanged.
    """
    config = dict(qnet.config)
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
    )
    move_like(snn, qnet)
    converted = copy.deepcopy(qnet.unet)
    install_neurons(converted, neuron, nonlinear_mode, time_embedding)
    snn.unet.load_state_dict(converted.state_dict())
    if threshold_form == "unit":
        fold_unit_thresholds(snn.unet)
    return snn.eval()
