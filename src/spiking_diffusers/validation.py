"""The bounds of every numeric setting, and the argument checks of the public API, in one place.

The ``sdm-*`` commands refuse a value outside :data:`BOUNDS` before any work (exit 2, with the bound and
why it is there); the Python API (``quantize``, ``convert``, the model classes, ``SpikingDiffusionPipeline``)
raises ``TypeError`` for an argument of the wrong type and ``ValueError`` for a value that cannot work,
each naming the argument and what it accepts. ``docs/robustness.md`` lists them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """An inclusive range ``low <= value <= high`` and why it is there."""

    low: float
    high: float
    why: str

    def describe(self) -> str:
        """``"1<=x<=1024"`` (as click writes a range)."""
        return f"{self.low}<=x<={self.high}"


MAX_TIMESTEPS = 1024
MAX_LEVELS = 1024
MAX_IMAGES = 100_000
MAX_SET_SIZE = 1_000_000
MAX_SEED = 2**63 - 1
MAX_THRESHOLD_GROUPS = 64

BOUNDS: dict[str, Bound] = {
    "timesteps": Bound(
        1,
        MAX_TIMESTEPS,
        "each UNet call simulates T time steps, a forward pass each: T = 1024 is already a thousand passes per "
        "denoising step",
    ),
    "levels": Bound(1, MAX_LEVELS, "L levels take T >= L time steps to express, and T is at most 1024"),
    "num_images": Bound(1, MAX_IMAGES, "every image is held in memory and tiled into one grid"),
    "num_samples": Bound(1, MAX_IMAGES, "every calibration image is held in memory (and in the cache)"),
    "set_size": Bound(
        1, MAX_SET_SIZE, "every input of the calibration set and the original model's output on it are held in memory"
    ),
    "seed": Bound(
        0,
        MAX_SEED,
        "a seed is a non-negative 63-bit integer, so that torch and numpy take it and seed + i (the seed of "
        "image i) stays a 64-bit seed",
    ),
    "eta": Bound(0, 1, "eta interpolates between deterministic DDIM (0) and DDPM-like noise (1)"),
    "threshold_groups": Bound(
        1,
        MAX_THRESHOLD_GROUPS,
        "each site keeps one threshold per group of diffusion timesteps, and each group needs calibration inputs "
        "of its own",
    ),
}
"""Name -> bound, for the settings whose useful range the type alone does not say.

The denoising steps have a bound that depends on the model: between 1 and the ``num_train_timesteps`` of
its scheduler (see :func:`spiking_diffusers.pipelines.schedulers.check_steps`).
"""


def check_int(value: Any, name: str, bound: Bound | str | None = None, low: int | None = None) -> int:
    """``value`` as an ``int``: a ``TypeError`` unless it is an integer (not a bool, not a float), a
    ``ValueError`` naming ``name`` unless it lies in ``bound`` (a :data:`BOUNDS` key or a :class:`Bound`) or is
    at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    value = int(value)
    if isinstance(bound, str):
        bound = BOUNDS[bound]
    if bound is not None and not bound.low <= value <= bound.high:
        raise ValueError(f"{name} must be in the range {bound.describe()}, got {value}: {bound.why}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")
    return value


def check_float(
    value: Any, name: str, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``), or a
    ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        ranged = " and ".join(part for part in (lower, upper) if part)
        raise ValueError(f"{name} must be a finite number{' ' + ranged if ranged else ''}, got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``name`` and listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool``, else a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def renamed(new: Any, old: Any, new_name: str, old_name: str) -> Any:
    """The value of an argument that was renamed from ``old_name`` to ``new_name`` (the old name still works
    for one release, with a ``FutureWarning``); giving both is a ``TypeError``."""
    if old is None:
        return new
    import warnings

    warnings.warn(f"{old_name} is deprecated; pass {new_name} (the SNN's time steps T).", FutureWarning, stacklevel=3)
    if new is not None:
        raise TypeError(f"Pass {new_name} only ({old_name} is its deprecated name).")
    return old
