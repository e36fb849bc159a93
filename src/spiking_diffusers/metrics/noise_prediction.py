"""How far a network's noise prediction is from the ANN's, across the diffusion schedule.

Sample quality compounds small errors over many denoising steps; this isolates one step. Fixed clean
images are noised to x_t at timesteps spread over the whole schedule (the same noise at every t), and
each network's prediction eps(x_t, t) is compared with the ANN's: ``||eps - eps_ann|| / ||eps_ann||``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..converter.probes import move_kwargs


def relative_error(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    """``||prediction - reference|| / ||reference||`` over all elements (Frobenius norms)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ.")
    return float((prediction.double() - reference.double()).norm() / reference.double().norm())


@dataclass
class NoisedInputs:
    """``samples[k]`` is the clean batch noised to diffusion timestep ``timesteps[k]``; ``conditions`` holds
    the conditioning of each of the B images (e.g. ``encoder_hidden_states``), empty for unconditional UNets."""

    samples: torch.Tensor  # (K, B, C, H, W)
    timesteps: torch.Tensor  # (K,), int64
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B, ...)


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

    ``forward_kwargs`` go to every call (e.g. ``spike_steps=T`` for a spiking UNet); each image's own
    ``inputs.conditions`` go with it.
    """
    param = next(unet.parameters())
    out = []
    for x, t in zip(inputs.samples, inputs.timesteps, strict=True):
        chunks = []
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(param.device, param.dtype)
            conditions = move_kwargs(
                {key: value[start : start + batch_size] for key, value in inputs.conditions.items()}, chunk
            )
            chunks.append(unet(chunk, t.to(param.device), **conditions, **forward_kwargs).sample.float().cpu())
        out.append(torch.cat(chunks))
    return torch.stack(out)


def noise_prediction_errors(predictions: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """:func:`relative_error` at each timestep of :func:`predict_noise` outputs."""
    return [relative_error(p, r) for p, r in zip(predictions, reference, strict=True)]
