"""Threshold guidance (SDM, training-free): scale the firing thresholds of a spiking UNet at inference.

A scale ``s`` multiplies every IF neuron's *firing* threshold (its spike amplitude stays lambda, see
:mod:`spiking_diffusers.converter.neurons`); ``s < 1`` makes neurons fire slightly more. It is a runtime
attribute of each neuron, so it changes per call without rebuilding or reloading the model, and ``s = 1``
is the model exactly as converted.

A scale is either one float for every neuron, or a mapping from block group to float, where the groups
follow the UNet's structure:

    time_embedding   time_embedding.act (and class_embedding.act for timestep class embeddings)
    down             down_blocks.*
    mid              mid_block.*
    up               up_blocks.*
    out              conv_act, the activation before the output convolution

Groups left out of a mapping keep scale 1. Sites that stay analog QCFS units (the time embedding of
``scale_shift`` UNets) have no firing threshold and are not affected.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

from ..converter.models import SpikingUNet2DModel

GROUPS = ("time_embedding", "down", "mid", "up", "out")

_PREFIXES = {
    "time_embedding.": "time_embedding",
    "class_embedding.": "time_embedding",
    "down_blocks.": "down",
    "mid_block.": "mid",
    "up_blocks.": "up",
}

ThresholdScale = float | Mapping[str, float]
"""A global factor, or a factor per block group (see :data:`GROUPS`)."""


def site_group(site: str) -> str:
    """The block group of a site name, e.g. ``down_blocks.0.resnets.1.act2`` -> ``"down"``."""
    if site == "conv_act":
        return "out"
    for prefix, group in _PREFIXES.items():
        if site.startswith(prefix):
            return group
    raise ValueError(f"Site {site!r} belongs to no threshold-guidance group ({', '.join(GROUPS)}).")


def _check_factor(value: float, where: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"threshold_scale{where} must be a number, got {value!r}.") from err
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"threshold_scale{where} must be a finite number > 0, got {value}.")
    return value


def group_scales(scale: ThresholdScale) -> dict[str, float]:
    """Validate ``scale`` and expand it to one factor per group (missing groups: 1.0)."""
    if isinstance(scale, Mapping):
        unknown = sorted(set(scale) - set(GROUPS))
        if unknown:
            raise ValueError(f"Unknown threshold_scale group(s) {unknown}; the groups are {', '.join(GROUPS)}.")
        return {group: _check_factor(scale.get(group, 1.0), f"[{group!r}]") for group in GROUPS}
    factor = _check_factor(scale, "")
    return dict.fromkeys(GROUPS, factor)


def is_identity(scale: ThresholdScale | None) -> bool:
    """Whether ``scale`` leaves every threshold as it is (``None``, 1.0, or 1.0 for every group)."""
    return scale is None or all(value == 1.0 for value in group_scales(scale).values())


def get_threshold_scales(model: SpikingUNet2DModel) -> dict[str, float]:
    """The current factor of every spiking site, by site name."""
    return {name: float(neuron.threshold_scale) for name, neuron in model.neurons().items()}


def set_threshold_scale(model: SpikingUNet2DModel, scale: ThresholdScale) -> dict[str, float]:
    """Set the threshold factor of every spiking site of ``model``; returns the previous factors by site."""
    if not isinstance(model, SpikingUNet2DModel):
        raise TypeError(f"Threshold guidance needs a SpikingUNet2DModel, got {type(model).__name__}.")
    by_group = group_scales(scale)
    previous = get_threshold_scales(model)
    for name, neuron in model.neurons().items():
        neuron.threshold_scale = by_group[site_group(name)]
    return previous


@contextlib.contextmanager
def scaled_thresholds(model: SpikingUNet2DModel, scale: ThresholdScale | None) -> Iterator[SpikingUNet2DModel]:
    """Run the block with the thresholds of ``model`` scaled by ``scale``; restore the previous factors after.

    ``None`` leaves the factors as they are.
    """
    if scale is None:
        yield model
        return
    previous = set_threshold_scale(model, scale)
    try:
        yield model
    finally:
        for name, neuron in model.neurons().items():
            neuron.threshold_scale = previous[name]
