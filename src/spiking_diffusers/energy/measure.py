"""Measuring the work on real inputs: the SNN over a sampling run with a diffusers scheduler, the ANN on
one forward pass (its MAC count does not depend on the input)."""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin
from torch import nn

from ..converter.building import spatial_size
from ..converter.models import SpikingUNet2DModel
from ..pipelines import SpikingDiffusionPipeline
from .accounting import Accounting, OperationCounter, inner_unet
from .report import EnergyModel, EnergyReport, build_report


def count_sampling(
    snn: SpikingUNet2DModel,
    scheduler: SchedulerMixin,
    steps: int,
    num_images: int,
    seed: int = 0,
    snn_timesteps: int | None = None,
) -> Accounting:
    """Count the work of ``snn`` while it samples ``num_images`` images in ``steps`` denoising steps."""
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    with OperationCounter(snn) as counter:
        pipe(
            batch_size=num_images,
            generator=generator,
            num_inference_steps=steps,
            output_type="pt",
            snn_timesteps=snn_timesteps,
        )
    return counter.accounting


@torch.no_grad()
def count_forward(model: nn.Module, timestep: int = 500) -> Accounting:
    """Count the work of one forward pass of ``model`` on one random input."""
    config = inner_unet(model).config
    height, width = spatial_size(config.sample_size)
    param = next(model.parameters())
    sample = torch.randn(1, config.in_channels, height, width, device=param.device, dtype=param.dtype)
    with OperationCounter(model) as counter:
        model(sample, torch.tensor([timestep], device=param.device))
    return counter.accounting


def measure_energy(
    snn: SpikingUNet2DModel,
    ann: nn.Module,
    scheduler: SchedulerMixin,
    steps: int,
    num_images: int = 4,
    seed: int = 0,
    snn_timesteps: int | None = None,
    energy_model: EnergyModel | None = None,
) -> EnergyReport:
    """The energy report of a spiking UNet against its ANN over one real sampling run of the SNN.

    ``snn_timesteps`` overrides the model's T for this run.
    """
    snn_counts = count_sampling(snn, scheduler, steps, num_images, seed, snn_timesteps)
    ann_counts = count_forward(ann)
    timesteps = int(snn_timesteps or snn.config.timesteps)
    return build_report(snn_counts, ann_counts, timesteps, num_images, energy_model)
