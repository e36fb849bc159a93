"""The diffusers schedulers the pipeline is tested with, by the short names the command line uses."""

from __future__ import annotations

import copy
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
)

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS: the Runge-Kutta warm-up alone takes 4 steps
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
}
"""Name -> (class, settings that override the model's own scheduler config)."""


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler called ``name`` with the noise schedule (betas, training steps) of the model's ``config``."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[name]
    try:
        return cls.from_config(dict(config), **overrides)
    except Exception as err:  # a damaged scheduler config: diffusers' errors say nothing of what to do
        from ..errors import InputError

        raise InputError(
            f"The model's scheduler config does not make a {cls.__name__} ({name}): {_first_line(err)}. Fix the "
            "model's scheduler_config.json (or copy the original model's), or pick another scheduler."
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_steps(scheduler: SchedulerMixin, steps: Any, name: str = "num_inference_steps") -> int:
    """``steps`` if ``scheduler`` can take that many denoising steps, else a ``ValueError`` naming ``name``
    (``TypeError`` for a non-integer) that says the bound and why, before any sampling.

    The bounds: at least 1 (and, for PNDM with its Runge-Kutta warm-up, at least 4: the warm-up alone takes
    4), at most the ``num_train_timesteps`` the model was trained with (a sampler has no more noise levels
    to visit). Any other refusal of the scheduler's ``set_timesteps`` is reported the same way.
    """
    from ..validation import check_int

    steps = check_int(steps, name, low=1)
    cls = type(scheduler).__name__
    train_steps = getattr(scheduler.config, "num_train_timesteps", None)
    if train_steps is not None and steps > int(train_steps):
        raise ValueError(
            f"{name} must be at most {train_steps}, got {steps}: the model was trained with {train_steps} noise "
            "levels and a sampler cannot take more steps than that."
        )
    order = getattr(scheduler, "pndm_order", None)
    if isinstance(scheduler, PNDMScheduler) and not scheduler.config.skip_prk_steps and order and steps < order:
        raise ValueError(
            f"{name} must be at least {order} for {cls} with its Runge-Kutta warm-up (the warm-up alone takes "
            f"{order} steps), got {steps}; take more steps or set skip_prk_steps=True (PLMS, as sdm-sample's "
            "pndm does)."
        )
    try:
        copy.deepcopy(scheduler).set_timesteps(steps)
    except Exception as err:  # a scheduler we have no rule for: say so before sampling, not inside it
        raise ValueError(f"{cls} cannot take {name} = {steps}: {err}") from err
    return steps
