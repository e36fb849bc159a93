"""Signed spike encoders for the weight layers that read real values ("residual spikes").

A convolution that reads the residual stream (a ResNet shortcut, a down- or up-sampling convolution) or an
attention projection gets real values in the spiking network, at every one of the T time steps: T times
the ANN's multiply-accumulates. With an encoder in front it reads ternary spikes (0, +lambda, -lambda) and
only accumulates. Its input is signed, so the encoder is too, with its own threshold lambda:

- in the QCFS network, the **signed QCFS** unit ``a(z) = lambda/L * clip(floor(z*L/lambda + phi), -L, L)``
  (``2L + 1`` levels; with ``phi = 1/2`` a symmetric rounding); its ``original`` is the identity, so
  ``as_ann()`` runs the ANN exactly;
- in the spiking network, the **ternary IF neuron** (reset by subtraction), with input current I(t):

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

from .qcfs import MIN_THRESHOLD, QuantizerUnit, broadcast_channels, floor_ste
from .temporal import TemporalModule


def signed_qcfs(
    z: torch.Tensor, threshold: torch.Tensor, levels: int, phi: float = 0.5, channels_last: bool = False
) -> torch.Tensor:
    """The signed QCFS function with straight-through gradients (as :func:`~.qcfs.qcfs`, range ``[-L, L]``).

    ``d a / d z`` is 1 where the level is inside ``[-L, L]``, 0 where the unit saturates; ``lambda`` gets
    ``+-1`` where it saturates and the quantization-error gradient inside. Per-channel thresholds
    broadcast on dim 1, or on the last dim with ``channels_last`` (token-major attention inputs).
    """
    lam = broadcast_channels(threshold, z, channels_last)
    level = floor_ste(z * levels / lam + phi)
    return lam / levels * torch.clamp(level, -levels, levels)


class SignedQCFS(QuantizerUnit):
    """The signed QCFS unit in front of one real-valued-input layer of the QCFS network.

    Calibration treats it like an activation site (statistics, threshold init, distillation); in
    ``mode = "ann"`` it passes its input through unchanged (``original`` is the identity).
    ``channels_last`` marks token-major inputs ``(B, N, C)`` (attention projections).
    """

    def __init__(
        self, channels: int, levels: int, phi: float = 0.5, per_channel: bool = False, channels_last: bool = False
    ):
        super().__init__(nn.Identity(), channels, levels, phi, per_channel)
        self.channels_last = bool(channels_last)

    def quantize(self, z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """:func:`signed_qcfs` at ``threshold``."""
        return signed_qcfs(z, threshold, self.levels, self.phi, self.channels_last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels_last={self.channels_last}"


class SignedIFNeuron(TemporalModule):
    """The ternary IF neuron that stands in for a :class:`SignedQCFS` unit in the spiking network.

    It emits ``+-lambda`` (``+-1`` in the unit-threshold form, where ``input_gain`` holds ``1 / lambda``
    and the consumer's weights carry ``lambda``). Threshold guidance does not act on it: it encodes a
    linear signal rather than standing in for an activation.
    """

    def __init__(self, channels: int, per_channel: bool = False, phi: float = 0.5, channels_last: bool = False):
        super().__init__()
        size = channels if per_channel else 1
        self.channels = channels
        self.per_channel = bool(per_channel)
        self.phi = float(phi)
        self.channels_last = bool(channels_last)
        self.threshold = nn.Parameter(torch.ones(size))
        self.register_buffer("input_gain", torch.ones(size))
        self.membrane: torch.Tensor | None = None

    def reset_state(self) -> None:
        self.membrane = None

    def amplitude(self, like: torch.Tensor) -> torch.Tensor:
        """The spike amplitude lambda (1 in the unit-threshold form), shaped to broadcast against ``like``."""
        return broadcast_channels(self.threshold.clamp_min(MIN_THRESHOLD), like, self.channels_last)

    def initial_membrane(self, current: torch.Tensor) -> torch.Tensor:
        """``v(0) = phi * theta``, shaped like one time step's ``current``."""
        return (self.amplitude(current).detach() * self.phi).expand_as(current).clone()

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        theta = self.amplitude(current)
        current = current * broadcast_channels(self.input_gain, current, self.channels_last)
        if self.execution == "batched":
            steps = self.split_time(current)
            if torch.is_grad_enabled():
                spikes = self._run(steps, theta.detach())
                return (spikes * theta + self._surrogate(steps, theta)).flatten(0, 1)
            if torch.jit.is_tracing():  # ONNX export: the in-place path's out= writes are not traced
                return (self._run(steps, theta) * theta).flatten(0, 1)
            return self._run_inplace(steps, theta).mul_(theta).flatten(0, 1)
        if self.membrane is None:
            self.membrane = self.initial_membrane(current)
        self.membrane, spike = self._integrate(self.membrane, current.detach(), theta.detach())
        return spike * theta

    @staticmethod
    def _integrate(
        membrane: torch.Tensor, current: torch.Tensor, theta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        membrane = membrane + current
        spike = (membrane >= theta).to(membrane.dtype) - (membrane < 0).to(membrane.dtype)
        return membrane - spike * theta, spike

    def _run(self, steps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """All T steps of ``(T, B, ...)`` currents; returns the spikes (+1 / 0 / -1) as a new tensor."""
        membrane = (theta * self.phi).expand_as(steps[0])
        spikes = []
        for t in range(self.num_steps):
            membrane, spike = self._integrate(membrane, steps[t].detach(), theta)
            spikes.append(spike)
        return torch.stack(spikes)

    def _run_inplace(self, steps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The same dynamics without autograd, in preallocated buffers (inference path)."""
        spikes = torch.empty_like(steps)
        membrane = (theta * self.phi).expand_as(steps[0]).clone()
        for t in range(self.num_steps):
            membrane.add_(steps[t])
            spike = torch.sub(membrane, theta, out=spikes[t]).ge_(0)  # 1.0 where it fires +1
            spike.sub_((membrane < 0).to(spike.dtype))
            membrane.addcmul_(spike, theta, value=-1)
        return spikes

    @staticmethod
    def _surrogate(steps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Zero-valued term giving each step's output ``d out / d I = 1`` where the mean input lies inside
        ``(-theta, theta)``: the gradient of the clip function the spike rate approximates."""
        inside = (steps.mean(0, keepdim=True).abs() < theta).to(steps.dtype)
        return (steps - steps.detach()) * inside

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, per_channel={self.per_channel}, phi={self.phi}, "
            f"channels_last={self.channels_last}"
        )
