"""Threshold balancing into the unit-threshold form that neuromorphic hardware wants.

Every neuron gets threshold 1 and emits binary spikes; its calibrated lambda moves into the weights:
the consumer layer's input columns are multiplied by lambda, and 1 / lambda is folded into the private
layer feeding the neuron (its GroupNorm affine or linear layer). Where the input is shared (the time
embedding feeds every ResNet block) or mixed (scale-shift modulation), 1 / lambda stays as the neuron's
input gain, as it does for the input encoders of residual spikes, whose input is shared or mixed. A
neuron's input shift and output offset (``offsets``) are divided by lambda too: the shift is subtracted
from the scaled current, and the consumer, whose weights now carry lambda, adds the same bias map as
before. The outputs are those of the lambda form up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import channel_view
from .neurons import IFNeuron
from .registry import handler_for
from .residual_spikes import fold_encoder_thresholds
from .sites import iter_site_specs, site_name, site_unit
from .temporal import TemporalOp


@torch.no_grad()
def fold_unit_thresholds(unet: nn.Module) -> None:
    """Rewrite the weights of a spiking UNet (lambda form) in place so that every threshold is 1."""
    for parent_name, parent, spec in list(iter_site_specs(unet)):
        neuron = site_unit(parent, spec)
        if not isinstance(neuron, IFNeuron):
            continue
        if spec.consumer is None:
            raise ValueError(
                f"threshold_form='unit' folds each threshold into the layer a site feeds, but "
                f"`{site_name(parent_name, spec)}` feeds a product or a layer outside its block (a transformer "
                "feed-forward); use threshold_form='lambda'."
            )
        lam = neuron.threshold.detach().clone()
        consumer = getattr(parent, spec.consumer)
        consumer.weight.mul_(channel_view(lam, consumer.weight, 1))
        source = getattr(parent, spec.source) if spec.source else None
        if isinstance(source, TemporalOp):
            source = source.op
        handler = handler_for(source) if source is not None else None
        if not (handler and handler.absorb_threshold and handler.absorb_threshold(source, lam)):
            neuron.input_gain.div_(lam)
        if neuron.output_offset is not None:
            neuron.input_shift.div_(lam)
            neuron.output_offset.div_(lam)
        neuron.threshold.fill_(1.0)
    fold_encoder_thresholds(unet)
