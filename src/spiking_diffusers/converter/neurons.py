"""Integrate-and-fire neurons (reset by subtraction): one charge / fire / reset core, three firing rules.

Dynamics, with input current I(t) and firing threshold theta:

    m(t) = v(t-1) + I(t);  s(t) = fire(m(t));  v(t) = m(t) - s(t) * theta;  v(0) = phi * theta

- :class:`IFNeuron` stands in for an activation call site: ``s = H(m - theta)``; with
  ``neuron="signed_if"`` (Fast-SNN) a neuron whose membrane falls below 0 after it has fired emits a
  negative spike, so its net spike count stays in [0, T].
- :class:`TernaryIFEncoder` feeds spikes to a weight layer that reads a signed real value (residual spikes):
  ``s = +1`` if ``m >= theta``, ``-1`` if ``m < 0``, else 0.

A neuron emits ``s(t) * lambda``: its calibrated QCFS threshold is the spike amplitude. Threshold guidance
scales the *firing* threshold of an :class:`IFNeuron` (and with it the reset and the initial membrane) by a
factor ``s`` while the amplitude stays ``lambda``. In the unit-threshold form lambda is 1 and the neuron's
input gain and outgoing weights carry the scale instead; both forms give the same outputs.

The state carried from one time step to the next is *declared* (``register_memory``, as SpikingJelly's
neurons do), so code that must handle it from outside (the single-step ONNX graph, a sampler that carries
it) enumerates :meth:`~.temporal.TemporalModule.memory_names` instead of knowing each neuron type.
"""

from __future__ import annotations

import torch
from torch import nn

from .qcfs import MIN_THRESHOLD, broadcast_channels
from .temporal import TemporalModule
from .timestep_groups import group_thresholds

NEURON_TYPES = ("if", "signed_if")


class SpikingNeuron(TemporalModule):
    """The charge / fire / reset core shared by every neuron; subclasses define :meth:`fire`.

    The spikes themselves carry no gradient. For SNN-aware training the output gets a straight-through
    term instead: ``d out / d I = 1`` wherever the neuron's mean input lies inside :meth:`passes`, the
    gradient of the clip function the spike rate approximates (the batched mode averages the input over
    all T steps; the step-wise mode, which does not know the future, judges each step's input).
    """

    def __init__(
        self, channels: int, per_channel: bool = False, phi: float = 0.5, channels_last: bool = False, groups: int = 1
    ):
        super().__init__()
        size = channels if per_channel else 1
        self.channels = channels
        self.per_channel = bool(per_channel)
        self.phi = float(phi)
        self.channels_last = bool(channels_last)
        # Timestep-aware thresholds: a (K, C) table, and each sample's row set around every call (.timestep_groups).
        self.threshold = nn.Parameter(torch.ones(groups, size) if groups > 1 else torch.ones(size))
        self.group_index: torch.Tensor | None = None
        self.spikes_per_step = 1
        # 1 / lambda in the unit-threshold form where no private layer before the neuron could absorb it.
        self.register_buffer("input_gain", torch.ones(size))
        # Offsets (an IF neuron's option): a constant current subtracted from the input, and the constant the
        # consumer layer adds for the unit's output offset (see converter/offsets.py); None without them.
        self.input_shift: nn.Parameter | None = None
        self.output_offset: nn.Parameter | None = None
        self.register_memory("membrane")

    # --- what a neuron type defines ---------------------------------------------------------------------

    def fire(self, membrane: torch.Tensor, firing: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        """The spikes (+1 / 0 / -1) of one step from the charged ``membrane``; may update ``memory``."""
        raise NotImplementedError

    def passes(self, mean_input: torch.Tensor, full_range: torch.Tensor) -> torch.Tensor:
        """Where the surrogate gradient passes: inside the range (up to ``full_range``, lambda) the spike rate
        follows its input."""
        raise NotImplementedError

    def modulate(self, current: torch.Tensor, step: torch.Tensor | int | None) -> torch.Tensor:
        """The input current of time step ``step`` (all steps, ``(T, B, ...)``, when ``None``)."""
        return current

    # --- thresholds and state ---------------------------------------------------------------------------

    def amplitude(self, like: torch.Tensor) -> torch.Tensor:
        """One spike's amplitude, lambda / ``spikes_per_step`` (1 in the unit-threshold form), shaped to
        broadcast against ``like`` (with timestep-aware thresholds, one row per sample of ``like``)."""
        lam = group_thresholds(self.threshold, self.group_index).clamp_min(MIN_THRESHOLD)
        lam = broadcast_channels(lam, like, self.channels_last)
        return lam if self.spikes_per_step == 1 else lam / self.spikes_per_step

    def firing_threshold(self, like: torch.Tensor) -> torch.Tensor:
        """The threshold the membrane is compared with."""
        return self.amplitude(like)

    def initial_memory(self, current: torch.Tensor, firing: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The state before the first step, shaped like one step's ``current``: ``v(0) = phi * theta``."""
        firing = self.firing_threshold(current) if firing is None else firing
        return {"membrane": (firing.detach() * self.phi).expand_as(current).clone()}

    def initial_membrane(self, current: torch.Tensor) -> torch.Tensor:
        """``v(0) = phi * theta`` (theta: the firing threshold), shaped like one time step's ``current``."""
        return self.initial_memory(current)["membrane"]

    # --- the core ---------------------------------------------------------------------------------------

    def step_dynamics(
        self, memory: dict[str, torch.Tensor], current: torch.Tensor, firing: torch.Tensor
    ) -> torch.Tensor:
        """Charge, fire, reset by subtraction: one time step on ``memory`` (updated), returning the spikes."""
        membrane = memory["membrane"] + current
        spike = self.fire(membrane, firing, memory)
        memory["membrane"] = membrane - spike * firing
        return spike

    @torch.no_grad()
    def simulate(self, steps: torch.Tensor, firing: torch.Tensor) -> torch.Tensor:
        """All T steps of ``(T, B, ...)`` currents from the initial state; returns the spikes ``(T, B, ...)``."""
        memory = self.initial_memory(steps[0], firing)
        return torch.stack([self.step_dynamics(memory, steps[t], firing) for t in range(self.num_steps)])

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        amplitude = self.amplitude(current)
        firing = self.firing_threshold(current).detach()
        current = current * broadcast_channels(self.input_gain, current, self.channels_last)
        if self.input_shift is not None:  # a constant bias current
            current = current - broadcast_channels(self.input_shift, current, self.channels_last)
        if self.execution == "batched":
            steps = self.modulate(self.split_time(current), None)
            if self.threshold.dim() == 2:  # per-sample rows (T, B, ...); a sample keeps its group at every step
                amplitude, firing = self.split_time(amplitude), self.split_time(firing)[0]
            return self._emit(self.simulate(steps, firing), amplitude, steps, steps.mean(0, keepdim=True)).flatten(0, 1)
        current = self.modulate(current, self.step)
        self.step += 1
        if self.membrane is None:
            self.load_memory(self.initial_memory(current, firing))
        memory = self.memory()
        with torch.no_grad():
            spike = self.step_dynamics(memory, current, firing)
        self.load_memory(memory)
        return self._emit(spike, amplitude, current, current)

    def _emit(
        self, spikes: torch.Tensor, amplitude: torch.Tensor, current: torch.Tensor, mean: torch.Tensor
    ) -> torch.Tensor:
        """``spikes * amplitude``, with a straight-through gradient to ``current`` where :meth:`passes` says so
        (judged on ``mean``) when autograd needs one."""
        needs_grad = torch.is_grad_enabled() and (current.requires_grad or amplitude.requires_grad)
        if not needs_grad or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return spikes * amplitude
        with torch.no_grad():
            full_range = amplitude * self.spikes_per_step
            passing = self.passes(mean, full_range).to(current.dtype)
        return _SurrogateSpikes.apply(spikes, amplitude, current, passing)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, per_channel={self.per_channel}, phi={self.phi}"


class _SurrogateSpikes(torch.autograd.Function):
    """``spikes * amplitude`` whose gradient reaches the input current where ``passing`` is 1 (the
    straight-through surrogate) and the amplitude through the spike counts.

    Autograd's form of the same, ``spikes * amplitude + (current - current.detach()) * passing``, costs three
    more passes over the (T, B, ...) tensor forward and two backward: a third of the elementwise work of an
    SNN-aware fine-tuning step on a CPU. Hand-written for the reason ``converter.qcfs._ClipFloor`` is.
    """

    @staticmethod
    def forward(ctx, spikes, amplitude, current, passing):
        ctx.current_shape, ctx.amplitude_shape = current.shape, amplitude.shape
        ctx.save_for_backward(spikes if ctx.needs_input_grad[1] else None, passing)
        return spikes * amplitude

    @staticmethod
    def backward(ctx, grad):
        spikes, passing = ctx.saved_tensors
        grad_amplitude = (grad * spikes).sum_to_size(ctx.amplitude_shape) if ctx.needs_input_grad[1] else None
        grad_current = (grad * passing).sum_to_size(ctx.current_shape) if ctx.needs_input_grad[2] else None
        return None, grad_amplitude, grad_current, None


class IFNeuron(SpikingNeuron):
    """An integrate-and-fire neuron layer standing in for one QCFS call site.

    ``neuron="signed_if"`` adds Fast-SNN's negative spikes: a neuron whose membrane falls below 0 after
    it has fired emits ``-lambda`` and adds the threshold back, so its net spike count stays in [0, T].
    ``tsm_steps`` gives it SDM's temporal-wise spiking mechanism: a learnable factor p_t on the input
    current of each step. ``burst`` = B > 1 makes it a multi-threshold (burst) neuron: each step it emits
    ``k = clip(floor(m / theta), 0, B)`` spikes of amplitude ``lambda / B`` (theta = lambda / B) and subtracts
    ``k * theta``, so T steps carry ``B * T`` levels: for a constant input it reproduces the QCFS unit of
    ``L = B * T`` levels exactly, for any phi. Each spike is one accumulate for the next layer.
    ``offsets`` carries a QCFS unit's input shift (subtracted from the input current, a bias current) and
    output offset (not added here: the consumer layer adds its constant contribution, so that the layer
    still reads spikes; see :mod:`~spiking_diffusers.converter.offsets`).
    """

    def __init__(
        self,
        channels: int,
        per_channel: bool = False,
        phi: float = 0.5,
        neuron: str = "if",
        tsm_steps: int = 0,
        burst: int = 1,
        groups: int = 1,
        offsets: bool = False,
        channels_last: bool = False,
    ):
        if neuron not in NEURON_TYPES:
            raise ValueError(f"Unknown neuron type {neuron!r}; choose one of {NEURON_TYPES}.")
        if int(burst) < 1 or (int(burst) > 1 and neuron != "if"):
            raise ValueError(f"burst must be a whole number >= 1, and > 1 only with neuron='if'; got {burst}.")
        super().__init__(channels, per_channel, phi, channels_last, groups=groups)
        self.neuron = neuron
        self.spikes_per_step = int(burst)
        if neuron == "signed_if":
            self.register_memory("spike_count")
        self.temporal_factors = nn.Parameter(torch.ones(tsm_steps)) if tsm_steps else None
        self.threshold_scale = 1.0
        if offsets:
            self.input_shift = nn.Parameter(torch.zeros(self.threshold.numel()))
            self.output_offset = nn.Parameter(torch.zeros(self.threshold.numel()))

    def firing_threshold(self, like: torch.Tensor) -> torch.Tensor:
        """The threshold the membrane is compared with: lambda times the threshold-guidance scale."""
        return self.amplitude(like) * self.threshold_scale

    def initial_memory(self, current: torch.Tensor, firing: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        memory = super().initial_memory(current, firing)
        if self.neuron == "signed_if":
            memory["spike_count"] = torch.zeros_like(memory["membrane"])
        return memory

    def fire(self, membrane: torch.Tensor, firing: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.spikes_per_step > 1:
            return torch.clamp(torch.floor(membrane / firing), 0, self.spikes_per_step)
        spike = (membrane >= firing).to(membrane.dtype)
        if self.neuron == "signed_if":
            spike = spike - ((membrane < 0) & (memory["spike_count"] > 0)).to(membrane.dtype)
            memory["spike_count"] = memory["spike_count"] + spike
        return spike

    def passes(self, mean_input: torch.Tensor, full_range: torch.Tensor) -> torch.Tensor:
        return (mean_input > 0) & (mean_input < full_range)

    def modulate(self, current: torch.Tensor, step: torch.Tensor | int | None) -> torch.Tensor:
        if self.temporal_factors is None:
            return current
        if self.temporal_factors.numel() != self.num_steps:
            raise ValueError(
                f"This neuron's temporal factors (TSM) were made for T = {self.temporal_factors.numel()}; "
                f"it cannot simulate T = {self.num_steps}."
            )
        factors = self.temporal_factors.to(current.dtype)
        if step is None:
            return current * factors.reshape(-1, *([1] * (current.dim() - 1)))
        return current * factors[step]

    def extra_repr(self) -> str:
        tsm = f", tsm_steps={self.temporal_factors.numel()}" if self.temporal_factors is not None else ""
        burst = f", burst={self.spikes_per_step}" if self.spikes_per_step > 1 else ""
        offsets = ", offsets=True" if self.input_shift is not None else ""
        return f"neuron={self.neuron!r}, {super().extra_repr()}{tsm}{burst}{offsets}"


class TernaryIFEncoder(SpikingNeuron):
    """The ternary IF neuron that stands in for a signed QCFS encoder (residual spikes).

    It emits ``+-lambda`` (``+-1`` in the unit-threshold form, where ``input_gain`` holds ``1 / lambda``
    and the consumer's weights carry ``lambda``). Threshold guidance does not act on it: it encodes a
    linear signal rather than standing in for an activation. ``channels_last`` marks token-major inputs
    ``(B, N, C)`` (attention projections). ``burst`` = B > 1 lets it emit up to B spikes of either sign per
    step, ``k = clip(floor(m / theta), -B, B)`` of amplitude ``lambda / B``: the signed QCFS unit of
    ``L = B * T`` levels for a constant input, as for a burst :class:`IFNeuron`.
    """

    def __init__(
        self, channels: int, per_channel: bool = False, phi: float = 0.5, channels_last: bool = False, burst: int = 1
    ):
        if int(burst) < 1:
            raise ValueError(f"burst must be a whole number >= 1; got {burst}.")
        super().__init__(channels, per_channel, phi, channels_last)
        self.spikes_per_step = int(burst)

    def fire(self, membrane: torch.Tensor, firing: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.spikes_per_step > 1:
            return torch.clamp(torch.floor(membrane / firing), -self.spikes_per_step, self.spikes_per_step)
        return (membrane >= firing).to(membrane.dtype) - (membrane < 0).to(membrane.dtype)

    def passes(self, mean_input: torch.Tensor, full_range: torch.Tensor) -> torch.Tensor:
        return mean_input.abs() < full_range

    def extra_repr(self) -> str:
        burst = f", burst={self.spikes_per_step}" if self.spikes_per_step > 1 else ""
        return f"{super().extra_repr()}, channels_last={self.channels_last}{burst}"
