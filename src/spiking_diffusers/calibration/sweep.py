"""The noise-prediction error sweep of a calibration report: ``||eps - eps_ann|| / ||eps_ann||`` of the QCFS
network and of its SNN at a few timesteps, the small-t end (where the error concentrates) included, before
and after calibration."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..metrics.noise_prediction import NoisedInputs, noise_prediction_errors, predict_noise
from .conditioning import LabelConditioning

SWEEP_TIMESTEPS = (1, 10, 50, 100, 250, 500, 750, 999)
"""Where the sweep probes a 1000-step schedule (scaled to others): dense at the small-t end."""


def sweep_inputs(
    x0: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    images: int,
    seed: int,
    conditioning: LabelConditioning | None = None,
) -> NoisedInputs:
    """``images`` of the calibration images (evenly spaced through the pool), noised with one fixed-seed
    noise to each of the :data:`SWEEP_TIMESTEPS`; with ``conditioning``, each with its own label."""
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor(sorted({min(max(1, round(t * steps / 1000)), steps - 1) for t in SWEEP_TIMESTEPS}))
    index = torch.linspace(0, len(x0) - 1, images).round().long()
    clean = x0[index]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=clean.dtype)
    samples = torch.stack([noise_scheduler.add_noise(clean, noise, t.expand(len(clean))) for t in timesteps])
    conditions = conditioning.kwargs(conditioning.pool_labels(len(x0))[index]) if conditioning is not None else {}
    return NoisedInputs(samples, timesteps, conditions)


def error_sweep(models: dict[str, nn.Module], reference: torch.Tensor, inputs: NoisedInputs) -> dict[str, list[float]]:
    """Each model's relative noise-prediction error against ``reference`` (the ANN's :func:`predict_noise`
    on ``inputs``), one value per timestep."""
    return {name: noise_prediction_errors(predict_noise(model, inputs), reference) for name, model in models.items()}
