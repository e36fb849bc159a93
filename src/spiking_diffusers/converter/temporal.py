"""Simulation time for the spiking network, and the ops that are not linear in the spikes.

The UNet's own forward runs unchanged. Only the modules defined here know about simulation time:
in ``"batched"`` execution their input holds all T time steps folded into the batch (``T * B``
samples, step-major), in ``"stepwise"`` execution they are called once per time step and keep state.
"""

from __future__ import annotations

import torch
from torch import nn

EXECUTION_MODES = ("batched", "stepwise")
NONLINEAR_MODES = ("compensated", "per_step")


class TemporalModule(nn.Module):
    """Base class of every module whose output depends on the simulation time step."""

    def __init__(self):
        super().__init__()
        self.num_steps = 1
        self.execution = "batched"
        self.step = 0

    def begin(self, num_steps: int, execution: str) -> None:
        """Start a new simulation of ``num_steps`` time steps: forget all state."""
        self.num_steps = num_steps
        self.execution = execution
        self.step = 0
        self.reset_state()

    def reset_state(self) -> None:
        """Drop the state carried between time steps (overridden by stateful modules)."""

    def split_time(self, x: torch.Tensor) -> torch.Tensor:
        """View a time-folded ``(T * B, ...)`` tensor as ``(T, B, ...)``."""
        return x.unflatten(0, (self.num_steps, -1))


class TemporalOp(TemporalModule):
    """Wraps an op that is not linear in its input (GroupNorm, attention) for the spiking network.

    ``"compensated"`` (expectation compensation, ECMT): with ``m_t`` the running mean of the inputs,
    step ``t`` emits ``t * f(m_t) - (t - 1) * f(m_{t-1})``, so the outputs up to ``T`` sum to
    ``T * f(mean input)``: exact in the mean. ``"per_step"`` applies ``f`` to each step's input (what the
    SDM reference code does): cheaper in state, biased. Either way the op passes real values, not spikes.
    """

    def __init__(self, op: nn.Module, method: str = "compensated"):
        super().__init__()
        if method not in NONLINEAR_MODES:
            raise ValueError(f"Unknown non-linear op mode {method!r}; choose one of {NONLINEAR_MODES}.")
        self.op = op
        self.method = method
        self.input_sum: torch.Tensor | None = None
        self.output_sum: torch.Tensor | None = None

    def reset_state(self) -> None:
        self.input_sum = None
        self.output_sum = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.method == "per_step":
            return self.op(x, *args, **kwargs)
        if self.execution == "batched":
            return self._compensated_batched(x, *args, **kwargs)
        return self._compensated_step(x, *args, **kwargs)

    def _compensated_batched(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        xt = self.split_time(x)
        counts = torch.arange(1, self.num_steps + 1, device=x.device, dtype=x.dtype)
        counts = counts.reshape(-1, *([1] * (xt.dim() - 1)))
        running_mean = (xt.cumsum(0) / counts).flatten(0, 1)
        totals = self.split_time(self.op(running_mean, *args, **kwargs)) * counts
        previous = torch.cat([torch.zeros_like(totals[:1]), totals[:-1]])
        return (totals - previous).flatten(0, 1)

    def _compensated_step(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.step += 1
        self.input_sum = x.clone() if self.input_sum is None else self.input_sum + x
        total = self.op(self.input_sum / self.step, *args, **kwargs) * self.step
        out = total if self.output_sum is None else total - self.output_sum
        self.output_sum = total
        return out

    def extra_repr(self) -> str:
        return f"method={self.method!r}"
