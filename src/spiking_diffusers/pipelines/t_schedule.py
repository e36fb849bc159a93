"""T schedules: the simulation length T of a spiking UNet chosen per denoising step.

With the QCFS levels L fixed, a spiking network tends to the unquantized (clipped) network as T grows, and
the error of a spiking noise prediction sits at small diffusion t, the last denoising steps. A schedule spends
extra time steps exactly there, e.g. T = 4 for most steps and T = 16 for the last 3, and pays for them in
energy and latency by its mean T per denoising step.

The text form (the command line's, and accepted in Python too):

    T           every denoising step simulates T time steps ("4")
    ITEM,...    items in denoising order (the first item is the noisiest step); an item is
                TxK: K steps at T, or T: the steps the TxK items leave, at T (at most one such item)

So ``"4,16x3"`` is 16 for the last 3 steps and 4 for all the others, ``"16x2,4,16x3"`` adds 2 steps at 16
at the start, and ``"8x10,16x10"`` (no bare T) gives every step explicitly: its counts must add up to the
number of denoising steps. Every T lies in 1..1024. In Python ``snn_timesteps`` also takes an ``int`` (every
step) or a list / tuple of ints, one per denoising step.

A scheduler that evaluates the UNet more than once at one noise level (PNDM's PLMS warm-up, which makes
``steps + 1`` UNet calls) uses that step's T for each of its evaluations.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..validation import BOUNDS

SCHEDULE_FORM = (
    "accepted: T for every step ('4'), or items T and TxK (K steps at T) in denoising order, where one bare T fills "
    "the steps the others leave ('4,16x3': the last 3 steps at 16, the rest at 4) or, without one, the counts add "
    f"up to the steps ('8x10,16x10'); T in {BOUNDS['timesteps'].low}..{BOUNDS['timesteps'].high}"
)
"""The accepted form, as every error about a schedule states it."""

PYTHON_FORMS = "an int T, a list of one int T per denoising step, a TSchedule or its text form"
"""What ``snn_timesteps`` takes in Python besides ``None`` (the model's own T)."""

_ITEM = re.compile(r"^(\d+)\s*(?:[xX]\s*(\d+))?$")


class TScheduleError(ValueError):
    """A T schedule that cannot work; the message names the problem and the accepted form."""


@dataclass(frozen=True)
class TSchedule:
    """T per denoising step, as ``(T, count)`` items in denoising order; ``count`` ``None`` fills the steps
    the other items leave (at most one such item). Build one with :meth:`parse`, :meth:`constant`,
    :meth:`from_steps` or :meth:`coerce`; ``str(schedule)`` is its text form."""

    items: tuple[tuple[int, int | None], ...]

    def __post_init__(self) -> None:
        if not self.items:
            raise TScheduleError(f"A T schedule needs at least one item; {SCHEDULE_FORM}.")
        bound = BOUNDS["timesteps"]
        for value, count in self.items:
            if not bound.low <= value <= bound.high:
                raise TScheduleError(f"T = {value} in the T schedule {self} is out of range; {SCHEDULE_FORM}.")
            if count is not None and count < 1:
                raise TScheduleError(f"The T schedule {self} gives {value} to {count} steps; {SCHEDULE_FORM}.")
        if sum(count is None for _, count in self.items) > 1:
            raise TScheduleError(f"The T schedule {self} has more than one bare T to fill steps; {SCHEDULE_FORM}.")

    # -- building --------------------------------------------------------------------------------------------

    @classmethod
    def constant(cls, timesteps: int) -> TSchedule:
        """T = ``timesteps`` at every denoising step."""
        return cls(((_check_t(timesteps, "spike_steps"), None),))

    @classmethod
    def from_steps(cls, values: Sequence[int], name: str = "spike_steps") -> TSchedule:
        """One T per denoising step, as given (``[4, 4, 16]``)."""
        if not values:
            raise TScheduleError(
                f"{name} is an empty list; give one T per denoising step, or a text schedule ({SCHEDULE_FORM})."
            )
        steps = [_check_t(value, f"{name}[{i}]") for i, value in enumerate(values)]
        items: list[tuple[int, int]] = []
        for value in steps:
            if items and items[-1][0] == value:
                items[-1] = (value, items[-1][1] + 1)
            else:
                items.append((value, 1))
        return cls(tuple(items))

    @classmethod
    def parse(cls, text: str, name: str = "spike_steps") -> TSchedule:
        """The schedule written as ``text`` (see the module doc); a :class:`TScheduleError` naming ``name``,
        the problem and the accepted form otherwise."""
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a string, got {type(text).__name__} {text!r}.")
        if not text.strip():
            raise TScheduleError(f"{name} is empty; {SCHEDULE_FORM}.")
        items: list[tuple[int, int | None]] = []
        for raw in text.split(","):
            item = raw.strip()
            match = _ITEM.match(item)
            if match is None:
                what = "an empty item" if not item else f"item {item!r}"
                raise TScheduleError(f"{name} {text!r} has {what}, which is neither T nor TxK; {SCHEDULE_FORM}.")
            value, count = int(match[1]), None if match[2] is None else int(match[2])
            bound = BOUNDS["timesteps"]
            if not bound.low <= value <= bound.high:
                raise TScheduleError(f"{name} {text!r}: T = {value} is out of range ({bound.why}); {SCHEDULE_FORM}.")
            if count == 0:
                raise TScheduleError(f"{name} {text!r}: item {item!r} gives T to 0 steps; {SCHEDULE_FORM}.")
            items.append((value, count))
        if sum(count is None for _, count in items) > 1:
            raise TScheduleError(
                f"{name} {text!r} has more than one bare T; only one item may fill the remaining steps, the others "
                f"say how many steps they take (TxK); {SCHEDULE_FORM}."
            )
        return cls(tuple(items))

    @classmethod
    def coerce(cls, value: Any, name: str = "spike_steps") -> TSchedule:
        """``value`` (:data:`PYTHON_FORMS`) as a schedule: ``TypeError`` for another type, :class:`TScheduleError`
        (a ``ValueError``) for a schedule that cannot work, each naming ``name`` and the accepted form."""
        if isinstance(value, TSchedule):
            return value
        if isinstance(value, str):
            return cls.parse(value, name)
        if isinstance(value, list | tuple):
            return cls.from_steps(value, name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return cls(((_check_t(value, name), None),))
        raise TypeError(f"{name} must be {PYTHON_FORMS}, got {type(value).__name__} {value!r}.")

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def fill(self) -> int | None:
        """The T that fills the remaining steps (``None`` for a schedule given step by step)."""
        return next((value for value, count in self.items if count is None), None)

    @property
    def fixed_steps(self) -> int:
        """Steps the ``TxK`` items take."""
        return sum(count for _, count in self.items if count is not None)

    @property
    def constant_timesteps(self) -> int | None:
        """T if every step has the same T, else ``None``."""
        values = {value for value, _ in self.items}
        return next(iter(values)) if len(values) == 1 else None

    @property
    def base(self) -> int:
        """The T most steps take (the filling T if there is one; else the commonest T, the smaller on a tie):
        the T a network is converted at, and the default L, when the schedule is the only T given."""
        if self.fill is not None:
            return self.fill
        totals: dict[int, int] = {}
        for value, count in self.items:
            totals[value] = totals.get(value, 0) + int(count)
        return min(totals, key=lambda value: (-totals[value], value))

    @property
    def max(self) -> int:
        """The largest T of the schedule."""
        return max(value for value, _ in self.items)

    def values(self) -> set[int]:
        """Every T the schedule uses (the filling T included even where it fills no step)."""
        return {value for value, _ in self.items}

    def per_step(self, num_inference_steps: int, name: str = "spike_steps") -> list[int]:
        """T for each of ``num_inference_steps`` denoising steps, in denoising order; a :class:`TScheduleError`
        if the schedule does not fit that many steps."""
        steps = int(num_inference_steps)
        fixed = self.fixed_steps
        if self.fill is None and fixed != steps:
            raise TScheduleError(
                f"{name} {self} gives T for {fixed} denoising steps, but there are {steps}; give one T per step "
                f"or a bare T to fill the others ({SCHEDULE_FORM})."
            )
        if fixed > steps:
            raise TScheduleError(
                f"{name} {self}: its TxK items take {fixed} denoising steps, more than the {steps} there are; "
                f"{SCHEDULE_FORM}."
            )
        out: list[int] = []
        for value, count in self.items:
            out += [value] * (steps - fixed if count is None else count)
        return out

    def mean(self, num_inference_steps: int, name: str = "spike_steps") -> float:
        """The mean T per denoising step: what energy and latency pay (relative to T at every step)."""
        values = self.per_step(num_inference_steps, name)
        return sum(values) / len(values)

    def per_call(self, scheduler_timesteps: Sequence[Any], num_inference_steps: int) -> list[int]:
        """T for each UNet evaluation of a sampling run over ``scheduler_timesteps`` (the scheduler's
        ``timesteps`` after ``set_timesteps(num_inference_steps)``): see :func:`call_steps`."""
        per_step = self.per_step(num_inference_steps)
        return [per_step[k] for k in call_steps(scheduler_timesteps, num_inference_steps)]

    def at_timesteps(
        self, diffusion_timesteps: Sequence[Any], scheduler_timesteps: Sequence[Any], num_inference_steps: int
    ) -> list[int]:
        """T at arbitrary diffusion timesteps: that of the denoising step (of a run over ``scheduler_timesteps``)
        whose noise level is nearest (the noise-prediction sweep of ``sdm-eval`` measures with it)."""
        calls = [float(t) for t in scheduler_timesteps]
        per_call = self.per_call(calls, num_inference_steps)
        out = []
        for t in (float(t) for t in diffusion_timesteps):
            nearest = min(range(len(calls)), key=lambda i: (abs(calls[i] - t), i))
            out.append(per_call[nearest])
        return out

    def __str__(self) -> str:
        return ",".join(str(value) if count is None else f"{value}x{count}" for value, count in self.items)


def call_steps(scheduler_timesteps: Sequence[Any], num_inference_steps: int) -> list[int]:
    """The denoising step (0-based) of each UNet evaluation over ``scheduler_timesteps``.

    Consecutive evaluations at the same timestep are one step (PNDM's warm-up evaluates its second noise level
    twice); where that does not give ``num_inference_steps`` steps, evaluations map onto steps in proportion.
    """
    values = [float(t) for t in scheduler_timesteps]
    groups: list[int] = []
    for i, t in enumerate(values):
        groups.append(0 if i == 0 else groups[-1] + (t != values[i - 1]))
    count = groups[-1] + 1 if groups else 0
    steps = int(num_inference_steps)
    if count == steps:
        return groups
    return [min(steps - 1, ((g + 1) * steps - 1) // count) for g in groups]


def mean_timesteps(per_call: Sequence[int], weights: Sequence[int] | None = None) -> float:
    """The mean of ``per_call`` T values (weighted, e.g. by batch size)."""
    weights = [1] * len(per_call) if weights is None else list(weights)
    total = sum(weights)
    return math.fsum(t * w for t, w in zip(per_call, weights, strict=True)) / total if total else float("nan")


def _check_t(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r} ({name.split('[')[0]} takes "
                        f"{PYTHON_FORMS}).")  # fmt: skip
    bound = BOUNDS["timesteps"]
    if not bound.low <= int(value) <= bound.high:
        raise TScheduleError(f"{name} must be in the range {bound.describe()}, got {value}: {bound.why}.")
    return int(value)


__all__ = ["PYTHON_FORMS", "SCHEDULE_FORM", "TSchedule", "TScheduleError", "call_steps", "mean_timesteps"]
