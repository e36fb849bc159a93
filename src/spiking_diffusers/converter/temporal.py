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
        self._memory_names: list[str] = []

    def register_memory(self, name: str) -> None:
        """Declare ``name`` as state carried from one time step to the next (``None`` until the first step)."""
        self._memory_names.append(name)
        setattr(self, name, None)

    def memory_names(self) -> tuple[str, ...]:
        """The declared state, in declaration order."""
        return tuple(self._memory_names)

    def memory(self) -> dict[str, torch.Tensor | None]:
        """The declared state by name (the tensors themselves, not copies)."""
        return {name: getattr(self, name) for name in self._memory_names}

    def load_memory(self, memory: dict[str, torch.Tensor | None]) -> None:
        """Set the declared state from ``memory`` (every declared name must be there)."""
        for name in self._memory_names:
            setattr(self, name, memory[name])

    def begin(self, num_steps: int, execution: str) -> None:
        """Start a new simulation of ``num_steps`` time steps: forget all state."""
        self.num_steps = num_steps
        self.execution = execution
        self.step = 0
        self.reset_state()

    def reset_state(self) -> None:
        """Drop the state carried between time steps."""
        for name in self._memory_names:
            setattr(self, name, None)

    def split_time(self, x: torch.Tensor) -> torch.Tensor:
        """View a time-folded ``(T * B, ...)`` tensor as ``(T, B, ...)``.

        ``reshape`` rather than ``unflatten``: the ONNX exporter's tracer fixes the batch size of an
        ``unflatten`` with -1, which breaks export with a dynamic batch (see ``spiking_diffusers.export``).
        """
        return x.reshape(self.num_steps, -1, *x.shape[1:])


def evaluated_steps(num_steps: int, evaluations: int | None) -> list[int]:
    """The 1-based time steps at which a held op computes ``f``: every step for ``None`` (or ``evaluations``
    >= ``num_steps``), else ``evaluations`` >= 2 steps spread evenly from the first to the last."""
    if evaluations is None or evaluations >= num_steps:
        return list(range(1, num_steps + 1))
    if evaluations < 2:
        raise ValueError(f"evaluations must be at least 2 (the first and the last step), got {evaluations}.")
    return sorted({round(1 + k * (num_steps - 1) / (evaluations - 1)) for k in range(evaluations)})


class TemporalOp(TemporalModule):
    """Wraps an op that is not linear in its input (GroupNorm, attention) for the spiking network.

    ``"compensated"`` (expectation compensation, ECMT): with ``m_t`` the running mean of the inputs,
    step ``t`` emits ``t * f(m_t) - (t - 1) * f(m_{t-1})``, so the outputs up to ``T`` sum to
    ``T * f(mean input)``: exact in the mean. ``"per_step"`` applies ``f`` to each step's input (what the
    SDM reference code does): cheaper in state, biased. Either way the op passes real values, not spikes.

    ``evaluations = E < T`` (compensated only) computes ``f`` at E of the T steps (the first, the last and
    evenly between): a step in between re-emits the last value, and each evaluation at step ``t`` emits
    ``t * f(m_t)`` minus everything emitted before. The outputs still sum to ``T * f(mean input)``, at E / T
    of the op's cost.
    """

    def __init__(self, op: nn.Module, method: str = "compensated", evaluations: int | None = None):
        super().__init__()
        if method not in NONLINEAR_MODES:
            raise ValueError(f"Unknown non-linear op mode {method!r}; choose one of {NONLINEAR_MODES}.")
        self.op = op
        self.method = method
        self.evaluations = evaluations
        self.recompute = isinstance(op, nn.GroupNorm)
        self.register_memory("input_sum")
        self.register_memory("output_sum")
        self.register_memory("held")

    def evaluated_steps(self) -> list[int]:
        """The 1-based time steps at which ``f`` is computed: all of them, or ``evaluations`` spread evenly
        from the first step to the last (see :func:`evaluated_steps`)."""
        return evaluated_steps(self.num_steps, self.evaluations)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.method == "per_step":
            return self.op(x, *args, **kwargs)
        if self.evaluations is not None and self.evaluations < self.num_steps:
            if self.execution == "batched":
                return self._held_batched(x, *args, **kwargs)
            return self._held_step(x, *args, **kwargs)
        if self.execution == "batched":
            return self._compensated_batched(x, *args, **kwargs)
        return self._compensated_step(x, *args, **kwargs)

    def _held_batched(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        steps = self.split_time(x)
        evaluated = self.evaluated_steps()
        sums = steps.cumsum(0)
        means = torch.stack([sums[t - 1] / t for t in evaluated])
        index = torch.tensor(evaluated, device=x.device) - 1

        def at_evaluated(value):  # time-folded extra inputs (e.g. cross-attention's context): those steps only
            if torch.is_tensor(value) and value.dim() and value.shape[0] == x.shape[0]:
                return self.split_time(value)[index].flatten(0, 1)
            return value

        args = tuple(at_evaluated(value) for value in args)
        kwargs = {key: at_evaluated(value) for key, value in kwargs.items()}
        values = self.op(means.flatten(0, 1), *args, **kwargs)
        values = values.reshape(len(evaluated), -1, *values.shape[1:])
        outputs, emitted, held = [], None, None
        for t in range(1, self.num_steps + 1):
            if t in evaluated:
                held = values[evaluated.index(t)]
                out = held * t if emitted is None else held * t - emitted
            else:  # step 1 is always evaluated, so a value is held
                out = held
            emitted = out if emitted is None else emitted + out
            outputs.append(out)
        return torch.stack(outputs).flatten(0, 1)

    def _held_step(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.step += 1
        self.input_sum = x.clone() if self.input_sum is None else self.input_sum + x
        if self.step in self.evaluated_steps():
            self.held = self.op(self.input_sum / self.step, *args, **kwargs)
            out = self.held * self.step if self.output_sum is None else self.held * self.step - self.output_sum
        else:  # step 1 is always evaluated, so a value is held
            out = self.held
        self.output_sum = out if self.output_sum is None else self.output_sum + out
        return out

    def _compensated_batched(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        steps = self.split_time(x)
        counts = torch.arange(1, self.num_steps + 1, device=x.device, dtype=x.dtype)
        counts = counts.reshape(-1, *([1] * (steps.dim() - 1)))
        if torch.is_grad_enabled():
            # The running means as one (T x T) matrix product over the leading dim: cumsum there, and its
            # backward (flip, cumsum, flip), took about 3x as long on CPU (SNN-aware fine-tuning).
            averaging = torch.ones(self.num_steps, self.num_steps, device=x.device, dtype=x.dtype).tril_()
            averaging = averaging / counts.reshape(-1, 1)
            running_mean = (averaging @ steps.reshape(self.num_steps, -1)).reshape(steps.shape)
        else:  # in place: a step-by-step running sum is much faster than cumsum over the leading dim on CPU
            running_mean = steps.clone()
            for t in range(1, self.num_steps):
                running_mean[t].add_(running_mean[t - 1])
            running_mean.div_(counts)
        values = self.op(running_mean.flatten(0, 1), *args, **kwargs)
        if torch.is_grad_enabled():
            # t * f(m_t) - (t - 1) * f(m_{t-1}) as one (T x T) product too: slicing and concatenating the
            # steps costs a zero-filled tensor per slice in the backward.
            emitting = torch.diag(counts.flatten()) - torch.diag(counts.flatten()[:-1], -1)
            return (emitting @ values.reshape(self.num_steps, -1)).reshape(values.shape)
        totals = self.split_time(values) * counts
        for t in range(self.num_steps - 1, 0, -1):
            totals[t].sub_(totals[t - 1])
        return totals.flatten(0, 1)

    def _compensated_step(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Only the running input sum is kept; the previous total t * f(mean) is recomputed for cheap ops
        # (GroupNorm) instead of being stored, which halves this op's state.
        self.step += 1
        previous_sum = self.input_sum
        self.input_sum = x.clone() if previous_sum is None else previous_sum + x
        total = self.op(self.input_sum / self.step, *args, **kwargs) * self.step
        if previous_sum is None:
            out = total
        elif self.recompute:
            out = total - self.op(previous_sum / (self.step - 1), *args, **kwargs) * (self.step - 1)
        else:
            out = total - self.output_sum
        self.output_sum = None if self.recompute else total
        return out

    def extra_repr(self) -> str:
        return f"method={self.method!r}"
