"""Which weight layers read real values, and how a spike encoder is put in front of them.

The option ``residual_spikes=True`` (of ``quantize``, the model configs and the calibration recipe) feeds
spikes to every weight layer that otherwise reads real values at each time step:

- the convolutions that read the residual stream (``encoded_inputs`` of each block's handler in
  :mod:`~spiking_diffusers.converter.blocks`) become :class:`EncodedConv2d`:
  the same convolution, same weights and state-dict keys, whose input first passes ``<layer>.encoder``;
  the linear layers of a transformer block that read real values (its ``proj_in`` / ``proj_out``, a
  feed-forward's input projection and its output layer after the gate product) become :class:`EncodedLinear`;
- every ``Attention`` is split at its projections (:mod:`~.encoded_attention`), with encoders
  ``<attention>.input_encoder`` (before ``to_q/to_k/to_v``) and ``<attention>.output_encoder`` (before
  ``to_out``).

An encoder is a :class:`~.encoders.SignedQCFS` unit in the QCFS network and a
:class:`~.encoders.TernaryIFEncoder` in the spiking network. Left real-valued on purpose: the first
convolution and the skip blocks' image-space paths (they read the analog image) and the time embedding's
first linear layer (the analog sinusoidal embedding).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .encoded_attention import encode_attention, fold_attention_thresholds, is_encoded
from .encoders import SignedQCFS
from .neurons import TernaryIFEncoder
from .registry import handler_for
from .timestep_groups import copy_threshold


class EncodedConv2d(nn.Conv2d):
    """A convolution that reads its input through a spike encoder (``self.encoder``).

    A subclass rather than a wrapper, so the weights keep their state-dict keys and the layer keeps its
    name: an ANN's weights load into it unchanged, and energy reports match it to the ANN's layer.
    """

    @classmethod
    def wrap(cls, conv: nn.Conv2d, encoder: nn.Module) -> EncodedConv2d:
        """An ``EncodedConv2d`` that shares ``conv``'s parameters, with ``encoder`` in front."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.encoder = encoder
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.encoder(x))


class EncodedLinear(nn.Linear):
    """A linear layer on token-major ``(..., C)`` inputs that reads them through a spike encoder (``self.encoder``,
    channels last); like :class:`EncodedConv2d`, a subclass that keeps the weights' state-dict keys."""

    @classmethod
    def wrap(cls, linear: nn.Linear, encoder: nn.Module) -> EncodedLinear:
        """An ``EncodedLinear`` that shares ``linear``'s parameters, with ``encoder`` in front."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.encoder = encoder
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.encoder(x))


def iter_residual_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(parent_name, parent, attribute)`` for every registered layer that reads real values (a
    handler may name a layer inside a child, ``net.2``: the parent is then that child)."""
    for name, module in model.named_modules():
        handler = handler_for(module)
        for path in handler.encoded_inputs(module) if handler else []:
            inner, _, attr = path.rpartition(".")
            parent = module.get_submodule(inner) if inner else module
            yield ".".join(part for part in (name, inner) if part), parent, attr


def install_input_encoders(model: nn.Module, levels: int, phi: float, per_channel: bool) -> None:
    """Put a :class:`SignedQCFS` encoder in front of every layer of ``model`` that reads real values and
    split every attention at its projections."""
    for attn in [module for module in model.modules() if isinstance(module, Attention)]:
        encode_attention(attn, levels, phi, per_channel)
    for _, parent, attr in list(iter_residual_layers(model)):
        layer = getattr(parent, attr)
        if isinstance(layer, nn.Linear):  # token-major input: channels last
            unit = SignedQCFS(layer.in_features, levels, phi, per_channel, channels_last=True)
            encoded = EncodedLinear.wrap(layer, unit)
        else:
            encoded = EncodedConv2d.wrap(layer, SignedQCFS(layer.in_channels, levels, phi, per_channel))
        # Downsample2D may hold the same convolution under two names (`conv` and `Conv2d_0`).
        for name, child in list(parent.named_children()):
            if child is layer:
                setattr(parent, name, encoded)


def input_encoders(model: nn.Module) -> dict[str, nn.Module]:
    """Every input encoder by name (``<layer>.encoder``, ``<attention>.input_encoder``, ...), in module order."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, (SignedQCFS, TernaryIFEncoder))
    }


def install_encoder_neurons(model: nn.Module, burst: int = 1) -> None:
    """Turn every :class:`SignedQCFS` encoder into a :class:`TernaryIFEncoder` with the same threshold (emitting
    up to ``burst`` spikes per step), in place."""
    for parent in list(model.modules()):
        for name, unit in list(parent.named_children()):
            if isinstance(unit, SignedQCFS):
                neuron = TernaryIFEncoder(unit.channels, unit.per_channel, unit.phi, unit.channels_last, burst)
                copy_threshold(neuron, unit)
                setattr(parent, name, neuron)


@torch.no_grad()
def fold_encoder_thresholds(model: nn.Module) -> None:
    """The unit-threshold form for the encoders: lambda into the input channels of the layers each feeds,
    1 / lambda into the neuron's input gain (its input is shared or mixed), threshold 1."""
    for module in model.modules():
        if is_encoded(module) and isinstance(module.input_encoder, TernaryIFEncoder):
            fold_attention_thresholds(module)
        elif isinstance(module, EncodedConv2d | EncodedLinear) and isinstance(module.encoder, TernaryIFEncoder):
            lam = module.encoder.threshold.detach().clone()  # per input channel: dim 1 of either weight
            per_channel = lam.reshape(1, -1, *([1] * (module.weight.dim() - 2)))
            module.weight.mul_(per_channel if lam.numel() > 1 else lam.reshape(()))
            module.encoder.input_gain.div_(lam)
            module.encoder.threshold.fill_(1.0)
