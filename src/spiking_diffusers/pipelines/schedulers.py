"""The diffusers schedulers the pipeline is tested with, by the short names the command line uses."""

from __future__ import annotations

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
    return cls.from_config(dict(config), **overrides)
