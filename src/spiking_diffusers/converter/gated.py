"""The feed-forward activations of diffusers' transformer blocks, rewritten with a module call site.

diffusers' ``GEGLU`` and ``GELU`` call ``F.gelu`` inside their forward, where no QCFS unit can stand in.
The block registry swaps each for the module below (same ``proj`` weights and state-dict keys) whose GELU
is an ``act`` module: a call site like any other, a QCFS unit and then an IF neuron.

GEGLU's output ``value * gelu(gate)`` multiplies two signals that both vary over simulation time, which
is not linear in spikes. :class:`GateProduct` takes both halves in one tensor, so that the spiking
network wraps it in a :class:`~.temporal.TemporalOp` like GroupNorm: compensated on the running means,
exact in the mean, and counted as real-valued work.
"""

from __future__ import annotations

import torch
from torch import nn


class GateProduct(nn.Module):
    """``value * gate`` on ``(..., 2C)`` holding ``[value, gate]`` along the last dim: one input, so that a
    ``TemporalOp`` compensates both factors together."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        value, gate = packed.chunk(2, dim=-1)
        return value * gate

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class GatedGELU(nn.Module):
    """diffusers' ``GEGLU`` (``proj``, then ``value * gelu(gate)``) with the GELU as the call site ``act``."""

    def __init__(self, proj: nn.Linear, approximate: str = "none"):
        super().__init__()
        self.proj = proj
        self.act = nn.GELU(approximate=approximate)
        self.product = GateProduct(proj.out_features // 2)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return self.product(torch.cat([value, self.act(gate)], dim=-1))


class ProjectedGELU(nn.Module):
    """diffusers' ``GELU`` activation module (``proj``, then GELU) with the GELU as the call site ``act``."""

    def __init__(self, proj: nn.Linear, approximate: str = "none"):
        super().__init__()
        self.proj = proj
        self.act = nn.GELU(approximate=approximate)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.act(self.proj(hidden_states))
