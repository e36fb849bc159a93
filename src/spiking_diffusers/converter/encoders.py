"""Signed spike encoders for the weight layers that read real values ("residual spikes").

A convolution that reads the residual stream (a ResNet shortcut, a down- or up-sampling convolution) or an
attention projection gets real values in the spiking network, at every one of the T time steps: T times
the ANN's multiply-accumulates. With an encoder in front it reads ternary spikes (0, +lambda, -lambda) and
only accumulates. Its input is signed, so the encoder is too, with its own threshold lambda:

- in the QCFS network, the **signed QCFS** unit ``a(z) = lambda/L * clip(floor(z*L/lambda + phi), -L, L)``
  (``2L + 1`` levels; with ``phi = 1/2`` a symmetric rounding); its ``original`` is the identity, so
  ``as_ann()`` runs the ANN exactly;
- in the spiking network, the **ternary IF encoder** (:class:`~.neurons.TernaryIFEncoder`, reset by
  subtraction), with input current I(t):

      m(t) = v(t-1) + I(t);  s(t) = +1 if m(t) >= theta, -1 if m(t) < 0, else 0
      v(t) = m(t) - s(t) * theta;  v(0) = phi * theta;  output theta * s(t)

  For a constant input z over T = L steps it emits exactly ``clip(floor(z*T/theta + phi), -T, T)`` net
  spikes, all of one sign: the signed QCFS value (the analogue of QCFS Theorem 1). For any input the
  spikes sum to ``sum I(t) + phi*theta - v(T)`` with ``v(T)`` in ``[0, theta)`` unless the neuron
  saturates, so with ``phi = 1/2`` the mean output is the mean input, unbiased, to within ``theta / (2T)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .qcfs import QuantizerUnit, broadcast_channels, clip_floor


def signed_qcfs(
    z: torch.Tensor, threshold: torch.Tensor, levels: int, phi: float = 0.5, channels_last: bool = False
) -> torch.Tensor:
    """The signed QCFS function with straight-through gradients (as :func:`~.qcfs.qcfs`, range ``[-L, L]``).

    ``d a / d z`` is 1 where the level is inside ``[-L, L]``, 0 where the unit saturates; ``lambda`` gets
    ``+-1`` where it saturates and the quantization-error gradient inside. Per-channel thresholds
    broadcast on dim 1, or on the last dim with ``channels_last`` (token-major attention inputs).
    """
    return clip_floor(z, broadcast_channels(threshold, z, channels_last), levels, phi, -levels)


class SignedQCFS(QuantizerUnit):
    """The signed QCFS unit in front of one real-valued-input layer of the QCFS network.

    Calibration treats it like an activation site (statistics, threshold init, distillation); in
    ``mode = "ann"`` it passes its input through unchanged (``original`` is the identity).
    ``channels_last`` marks token-major inputs ``(B, N, C)`` (attention projections).
    """

    def __init__(
        self, channels: int, levels: int, phi: float = 0.5, per_channel: bool = False, channels_last: bool = False
    ):
        super().__init__(nn.Identity(), channels, levels, phi, per_channel, channels_last)

    def quantize(self, z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """:func:`signed_qcfs` at ``threshold``."""
        return signed_qcfs(z, threshold, self.levels, self.phi, self.channels_last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels_last={self.channels_last}"
