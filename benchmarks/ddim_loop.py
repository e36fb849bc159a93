"""The DDIM loop that ``trajectory.py`` and ``sensitivity.py`` write out: their noise prediction changes from one
denoising step to the next (another network, or a perturbation), which a pipeline, running one network
throughout, does not allow. The noises are the evaluation's (one generator per image index), so the samples
pair with ``sdm-eval``'s."""

from __future__ import annotations

from collections.abc import Callable

import torch

from spiking_diffusers.evaluation.sampling import image_generators
from spiking_diffusers.pipelines import make_scheduler


def initial_noise(unet_config, indices: range) -> torch.Tensor:
    """The starting noise of the images ``indices``, one generator per image as in the evaluation."""
    shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    return torch.stack([torch.randn(shape, generator=g) for g in image_generators(0, indices)])


@torch.no_grad()
def ddim_samples(
    unet_config,
    scheduler_config: dict,
    num_images: int,
    steps: int,
    predict: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int = 100,
) -> torch.Tensor:
    """DDIM (eta 0) samples in [-1, 1]; ``predict(i, t, x)`` is the noise prediction at denoising step i."""
    images = []
    for start in range(0, num_images, batch):
        x = initial_noise(unet_config, range(start, min(num_images, start + batch)))
        scheduler = make_scheduler("ddim", scheduler_config)
        scheduler.set_timesteps(steps)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(predict(i, t, x), t, x).prev_sample
        images.append(x.clamp(-1, 1))
    return torch.cat(images)
