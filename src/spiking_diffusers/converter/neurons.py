"""Integrate-and-fire neurons (reset by subtraction), plain and signed (Fast-SNN).

Dynamics, with input current I(t) and firing threshold theta:

    m(t) = v(t-1) + I(t);  s(t) = H(m(t) - theta);  v(t) = m(t) - s(t) * theta;  v(0) = phi * theta

The neuron emits ``s(t) * lambda``: its calibrated QCFS threshold is the spike amplitude. Threshold
guidance scales the *firing* threshold (and with it the reset and the initial membrane) by a factor
``s`` while the amplitude stays ``lambda``, which is what scaling the threshold of a binary-spike neuron
with fixed outgoing weights means. In the unit-threshold form lambda is 1 and the neuron's input and
outgoing weights carry the scale instead; both forms give the same outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .qcfs import MIN_THRESHOLD, broadcast_channels
from .temporal import TemporalModule

NEURON_TYPES = ("if", "signed_if")


class IFNeuron(TemporalModule):
    """An integrate-and-fire neuron layer standing in for one QCFS call site.

    ``neuron="signed_if"`` adds Fast-SNN's negative spikes: a neuron whose membrane falls below 0 after
    it has fired emits ``-lambda`` and adds the threshold back, so its net spike count stays in [0, T].
    """

    def __init__(
        self, channels: int, per_channel: bool = False, phi: float = 0.5, neuron: str = "if", tsm_steps: int = 0
    ):
        super().__init__()
        if neuron not in NEURON_TYPES:
            raise ValueError(f"Unknown neuron type {neuron!r}; choose one of {NEURON_TYPES}.")
        size = channels if per_channel else 1
        self.channels = channels
        self.per_channel = bool(per_channel)
        self.phi = float(phi)
        self.neuron = neuron
        self.threshold = nn.Parameter(torch.ones(size))
        # 1 / lambda in the unit-threshold form where no private layer before the neuron could absorb it.
        self.register_buffer("input_gain", torch.ones(size))
        # Temporal-wise spiking mechanism (SDM): a learnable factor p_t on the input current of each step.
        self.temporal_factors = nn.Parameter(torch.ones(tsm_steps)) if tsm_steps else None
        self.threshold_scale = 1.0
        self.membrane: torch.Tensor | None = None
        self.spike_count: torch.Tensor | None = None

    def reset_state(self) -> None:
        self.membrane = None
        self.spike_count = None

    def amplitude(self, like: torch.Tensor) -> torch.Tensor:
        """The spike amplitude lambda (1 in the unit-threshold form), shaped to broadcast against ``like``."""
        return broadcast_channels(self.threshold.clamp_min(MIN_THRESHOLD), like)

    def firing_threshold(self, like: torch.Tensor) -> torch.Tensor:
        """The threshold the membrane is compared with: lambda times the threshold-guidance scale."""
        return self.amplitude(like) * self.threshold_scale

    def initial_membrane(self, current: torch.Tensor) -> torch.Tensor:
        """``v(0) = phi * theta`` (theta: the firing threshold), shaped like one time step's ``current``."""
        return (self.firing_threshold(current).detach() * self.phi).expand_as(current).clone()

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        amplitude = self.amplitude(current)
        firing = amplitude * self.threshold_scale
        current = current * broadcast_channels(self.input_gain, current)
        if self.execution == "batched":
            steps = self.split_time(current)
            if self.temporal_factors is not None:
                steps = steps * self._factors().reshape(-1, *([1] * (steps.dim() - 1))).to(steps.dtype)
            if torch.is_grad_enabled():
                spikes = self._run_differentiable(steps, firing.detach())
                return (spikes * amplitude + self._surrogate(steps, amplitude)).flatten(0, 1)
            if torch.jit.is_tracing():  # ONNX export: the tracer does not record the in-place path's out= writes
                return (self._run_differentiable(steps, firing) * amplitude).flatten(0, 1)
            return self._run_inplace(steps, firing).mul_(amplitude).flatten(0, 1)
        if self.temporal_factors is not None:
            current = current * self._factors()[self.step].to(current.dtype)
        self.step += 1
        if self.membrane is None:
            self.membrane = self.initial_membrane(current)
            self.spike_count = torch.zeros_like(current) if self.neuron == "signed_if" else None
        self.membrane, spike, self.spike_count = self._integrate(
            self.membrane, current.detach(), firing.detach(), self.spike_count
        )
        return spike * amplitude

    def _factors(self) -> torch.Tensor:
        if self.temporal_factors.numel() != self.num_steps:
            raise ValueError(
                f"This neuron's temporal factors (TSM) were made for T = {self.temporal_factors.numel()}; "
                f"it cannot simulate T = {self.num_steps}."
            )
        return self.temporal_factors

    def _integrate(
        self, membrane: torch.Tensor, current: torch.Tensor, firing: torch.Tensor, count: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        membrane = membrane + current.detach()
        spike = (membrane >= firing).to(membrane.dtype)
        if count is not None:
            spike = spike - ((membrane < 0) & (count > 0)).to(membrane.dtype)
            count = count + spike
        return membrane - spike * firing, spike, count

    def _run_differentiable(self, steps: torch.Tensor, firing: torch.Tensor) -> torch.Tensor:
        """All T steps of ``(T, B, ...)`` currents; returns the spikes (+1 / 0 / -1) as a new tensor."""
        membrane = (firing * self.phi).expand_as(steps[0])
        count = torch.zeros_like(steps[0]) if self.neuron == "signed_if" else None
        spikes = []
        for t in range(self.num_steps):
            membrane, spike, count = self._integrate(membrane, steps[t], firing, count)
            spikes.append(spike)
        return torch.stack(spikes)

    def _run_inplace(self, steps: torch.Tensor, firing: torch.Tensor) -> torch.Tensor:
        """The same dynamics without autograd, updating preallocated buffers in place (inference path)."""
        spikes = torch.empty_like(steps)
        membrane = (firing * self.phi).expand_as(steps[0]).clone()
        count = torch.zeros_like(steps[0]) if self.neuron == "signed_if" else None
        for t in range(self.num_steps):
            membrane.add_(steps[t])
            spike = torch.sub(membrane, firing, out=spikes[t]).ge_(0)  # 1.0 where it fires, without a bool copy
            if count is not None:
                spike.sub_(((membrane < 0) & (count > 0)).to(spike.dtype))
                count.add_(spike)
            membrane.addcmul_(spike, firing, value=-1)
        return spikes

    @staticmethod
    def _surrogate(steps: torch.Tensor, amplitude: torch.Tensor) -> torch.Tensor:
        """Zero-valued term that gives the spike train a straight-through gradient.

        Each step's output gets ``d out / d I = 1`` wherever the neuron's mean input lies inside
        ``(0, lambda)``: the gradient of the clip function the spike rate approximates.
        """
        mean = steps.mean(0, keepdim=True)
        inside = ((mean > 0) & (mean < amplitude)).to(steps.dtype)
        return (steps - steps.detach()) * inside

    def extra_repr(self) -> str:
        tsm = f", tsm_steps={self.temporal_factors.numel()}" if self.temporal_factors is not None else ""
        return f"neuron={self.neuron!r}, channels={self.channels}, per_channel={self.per_channel}, phi={self.phi}{tsm}"
