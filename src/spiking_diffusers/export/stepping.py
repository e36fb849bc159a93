"""One simulation time step of a spiking UNet as a pure function of its state, for stateful runtimes.

``SpikingUNet2DModel`` keeps its state (membrane potentials, compensation sums, a Python step counter)
inside its modules between calls. An exported graph cannot: :class:`SpikingStep` takes every state tensor
as an input and returns the updated one as an output, so a runtime calls the same graph T times and owns
the state in between. Numerically it is the model's ``"stepwise"`` execution.

State, in :meth:`SpikingStep.state_names` order:

- every neuron's declared state (``memory_names``): ``<site>.membrane`` for every IF neuron, and
  ``<site>.spike_count`` (the signed count) for signed neurons; then ``<layer>.encoder.membrane`` for every
  ternary input encoder (residual spikes). The neurons' own stepwise code updates them.
- ``<op>.input_sum`` and ``<op>.output_sum`` for every compensated GroupNorm / attention (attention
  core, for an attention split by residual spikes). The model's own
  stepwise path branches on the first step and, for GroupNorm, recomputes the previous total instead of
  storing it; a graph that serves every step cannot branch on a step index that is an input, so here the
  previous total is state too (zero before the first step) and step ``t`` emits
  ``t * f(input_sum / t) - output_sum``: the same expectation compensation, branch-free.
- the step index (steps done so far, a float tensor of shape ``(1,)``), shared by all compensated ops.

The initial state (:meth:`SpikingStep.initial_state`) is zero everywhere except the membranes, which
start at ``phi`` times the firing threshold.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..converter.models import SpikingUNet2DModel
from ..converter.neurons import IFNeuron, SpikingNeuron
from ..converter.residual_spikes import input_encoders
from ..converter.sites import site_units
from ..converter.temporal import TemporalModule, TemporalOp
from ..converter.timestep_groups import grouped_sites, schedule_length, selected_groups, timestep_groups


class CompensatedStep(nn.Module):
    """A compensated ``TemporalOp`` with explicit state: ``input_sum``, ``output_sum`` and ``step``
    (steps done before this one) are set by :class:`SpikingStep` before the call and read after it."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op
        self.input_sum: torch.Tensor | None = None
        self.output_sum: torch.Tensor | None = None
        self.step: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        count = self.step + 1
        self.input_sum = self.input_sum + x
        total = self.op(self.input_sum / count, *args, **kwargs) * count
        out = total - self.output_sum
        self.output_sum = total
        return out


class SpikingStep(nn.Module):
    """``forward(sample, timestep, step, *state) -> (output, next_step, *next_state)`` for one time step.

    ``output`` is this time step's output layer (through the output filter, if the model has one); the spiking
    model's output is its mean over the T steps.
    ``snn`` is copied, not changed.
    """

    def __init__(self, snn: SpikingUNet2DModel):
        super().__init__()
        self.unet = copy.deepcopy(snn.unet)
        self.neurons: dict[str, SpikingNeuron] = {
            name: unit for name, unit in site_units(self.unet).items() if isinstance(unit, IFNeuron)
        }
        if any(neuron.temporal_factors is not None for neuron in self.neurons.values()):
            raise ValueError(
                "The single-step graph does not support temporal factors (TSM) yet; export the unrolled graph."
            )
        self.neurons.update(input_encoders(self.unet))
        self.ops: dict[str, CompensatedStep] = {}
        for name, module in list(self.unet.named_modules()):
            if isinstance(module, TemporalOp) and module.method == "compensated":
                parent_name, _, attr = name.rpartition(".")
                self.ops[name] = CompensatedStep(module.op)
                setattr(self.unet.get_submodule(parent_name), attr, self.ops[name])
        for module in self.unet.modules():
            if isinstance(module, TemporalModule):
                module.begin(1, "stepwise")
        # Timestep-aware thresholds: the graph picks each sample's row of every threshold table from `timestep`.
        self.threshold_groups = int(snn.config.threshold_groups)
        self.schedule_length = schedule_length(snn.config.unet_config)
        self.grouped = grouped_sites(self.unet)
        # Linear, with a constant term: filtering each step's output gives the filter of their mean.
        self.output_filter = copy.deepcopy(snn.output_filter)

    def _timestep_groups(self, sample: torch.Tensor, timestep: torch.Tensor) -> contextlib.AbstractContextManager:
        if self.threshold_groups == 1:
            return contextlib.nullcontext()
        index = timestep_groups(timestep, sample.shape[0], self.threshold_groups, self.schedule_length, sample.device)
        return selected_groups(self.grouped, index)

    def state_names(self) -> list[str]:
        """Names of the state tensors, in the order ``forward`` takes and returns them."""
        names = [f"{site}.{memory}" for site, neuron in self.neurons.items() for memory in neuron.memory_names()]
        for op in self.ops:
            names += [f"{op}.input_sum", f"{op}.output_sum"]
        return names

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, step: torch.Tensor, *state: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        values = iter(state)
        for neuron in self.neurons.values():
            neuron.load_memory({name: next(values) for name in neuron.memory_names()})
        for op in self.ops.values():
            op.input_sum, op.output_sum, op.step = next(values), next(values), step
        try:
            with self._timestep_groups(sample, timestep):
                out = self.unet(sample, timestep).sample
            if self.output_filter is not None:
                out = self.output_filter(out, sample, timestep)
            return (out, step + 1, *self._state())
        finally:
            self._forget_state()

    @torch.no_grad()
    def initial_state(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(step, *state)`` before the first time step, for a batch shaped like ``sample``.

        The shapes come from one probe step, whose pre-hooks give every module its starting state
        (membrane ``phi`` x firing threshold, as the IF neuron starts itself; zero sums) and record it.
        """
        step = torch.zeros(1, dtype=sample.dtype, device=sample.device)
        initial: dict[int, list[torch.Tensor]] = {}

        def start_neuron(neuron: SpikingNeuron, args) -> None:
            memory = neuron.initial_memory(args[0])
            neuron.load_memory(memory)
            initial[id(neuron)] = list(memory.values())

        def start_op(op: CompensatedStep, args) -> None:
            op.input_sum, op.output_sum, op.step = torch.zeros_like(args[0]), 0, step

        def record_op(op: CompensatedStep, args, output: torch.Tensor) -> None:
            # zero sums shaped like the op's input and output (an attention core's differ: q, k, v packed in)
            initial[id(op)] = [torch.zeros_like(args[0]), torch.zeros_like(output)]

        hooks = [neuron.register_forward_pre_hook(start_neuron) for neuron in self.neurons.values()]
        hooks += [op.register_forward_pre_hook(start_op) for op in self.ops.values()]
        hooks += [op.register_forward_hook(record_op) for op in self.ops.values()]
        try:
            with self._timestep_groups(sample, timestep):
                self.unet(sample, timestep)
        finally:
            for hook in hooks:
                hook.remove()
            self._forget_state()
        modules = [*self.neurons.values(), *self.ops.values()]
        return (step, *(value for module in modules for value in initial[id(module)]))

    def _state(self) -> list[torch.Tensor]:
        state = [value for neuron in self.neurons.values() for value in neuron.memory().values()]
        for op in self.ops.values():
            state += [op.input_sum, op.output_sum]
        return state

    def _forget_state(self) -> None:
        for neuron in self.neurons.values():
            neuron.reset_state()
        for op in self.ops.values():
            op.input_sum = op.output_sum = op.step = None
