"""How far a network's noise prediction is from the ANN's, across the diffusion schedule.

Sample quality compounds small errors over many denoising steps; this isolates one step. Fixed clean
images are noised to x_t at timesteps spread over the whole schedule (the same noise at every t), and
each network's prediction eps(x_t, t) is compared with the ANN's: ``||eps - eps_ann|| / ||eps_ann||``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import nn


def relative_error(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    """``||prediction - reference|| / ||reference||`` over all elements (Frobenius norms)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ.")
    return float((prediction.double() - reference.double()).norm() / reference.double().norm())


@dataclass
class NoisedInputs:
    """``samples[k]`` is the clean batch noised to diffusion timestep ``timesteps[k]``."""

    samples: torch.Tensor  # (K, B, C, H, W)
    timesteps: torch.Tensor  # (K,), int64


def noised_inputs(
    clean: torch.Tensor, noise_scheduler: DDPMScheduler, num_timesteps: int = 10, seed: int = 0
) -> NoisedInputs:
    """``clean`` images (in ``[-1, 1]``) noised by the training forward process at ``num_timesteps``
    timesteps evenly spread over ``[1, num_train_timesteps - 1]`` (from 1: Fourier time embeddings
    take ``log t``)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}.")
    train_steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(1, train_steps - 1, num_timesteps).round().long().unique()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=clean.dtype)
    samples = torch.stack([noise_scheduler.add_noise(clean, noise, t.expand(len(clean))) for t in timesteps])
    return NoisedInputs(samples, timesteps)


@torch.no_grad()
def predict_noise(unet: nn.Module, inputs: NoisedInputs, batch_size: int = 64, **forward_kwargs) -> torch.Tensor:
    """``unet``'s output on every noised input, shape ``(K, B, C, H, W)``, on the CPU in float32.

    ``forward_kwargs`` go to every call (e.g. ``spike_steps=T`` for a spiking UNet).
    """
    param = next(unet.parameters())
    out = []
    for x, t in zip(inputs.samples, inputs.timesteps, strict=True):
        chunks = [
            unet(chunk.to(param.device, param.dtype), t.to(param.device), **forward_kwargs).sample.float().cpu()
            for chunk in x.split(batch_size)
        ]
        out.append(torch.cat(chunks))
    return torch.stack(out)


def noise_prediction_errors(predictions: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """:func:`relative_error` at each timestep of :func:`predict_noise` outputs."""
    return [relative_error(p, r) for p, r in zip(predictions, reference, strict=True)]
