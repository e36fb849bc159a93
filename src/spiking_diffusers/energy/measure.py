"""Measuring the work on real inputs: the SNN over a sampling run with a diffusers scheduler, the ANN on
one forward pass (its MAC count does not depend on the input).

With a T schedule (T per denoising step) the counts follow it, and the report states the mean T per UNet
evaluation, taken from the calls the SNN actually received.
"""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin
from torch import nn

from ..converter.building import spatial_size
from ..converter.models import SpikingUNet2DModel
from ..pipelines import SpikingDiffusionPipeline, TSchedule
from ..pipelines.t_schedule import mean_timesteps
from .accounting import Accounting, OperationCounter, inner_unet
from .report import EnergyModel, EnergyReport, build_report


def count_sampling(
    snn: SpikingUNet2DModel,
    scheduler: SchedulerMixin,
    steps: int,
    num_images: int,
    seed: int = 0,
    snn_timesteps: int | str | list[int] | TSchedule | None = None,
) -> Accounting:
    """Count the work of ``snn`` while it samples ``num_images`` images in ``steps`` denoising steps
    (``snn_timesteps``: a T or a T schedule, as the pipeline takes it)."""
    return _count_sampling(snn, scheduler, steps, num_images, seed, snn_timesteps)[0]


def _count_sampling(snn, scheduler, steps, num_images, seed, snn_timesteps) -> tuple[Accounting, float]:
    """The counts of a sampling run, and the mean T over its UNet evaluations (weighted by batch size)."""
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    calls: list[tuple[int, int]] = []  # (T, batch) of every UNet evaluation

    def record(module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        given = kwargs.get("spike_steps")
        calls.append((int(module.config.timesteps) if given is None else int(given), sample.shape[0]))

    hook = snn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with OperationCounter(snn) as counter:
            pipe(
                batch_size=num_images,
                generator=generator,
                num_inference_steps=steps,
                output_type="pt",
                spike_steps=snn_timesteps,
            )
    finally:
        hook.remove()
    return counter.accounting, mean_timesteps([t for t, _ in calls], [b for _, b in calls])


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
    snn_timesteps: int | str | list[int] | TSchedule | None = None,
    energy_model: EnergyModel | None = None,
) -> EnergyReport:
    """The energy report of a spiking UNet against its ANN over one real sampling run of the SNN.

    ``snn_timesteps`` overrides the model's T for this run: one T, or a T schedule (T per denoising step;
    the report then states the schedule and its mean T, and every per-step figure is a mean over the steps).
    """
    snn_counts, mean_t = _count_sampling(snn, scheduler, steps, num_images, seed, snn_timesteps)
    ann_counts = count_forward(ann)
    if snn_timesteps is None:
        timesteps: int | str = int(snn.config.timesteps)
    else:
        schedule = TSchedule.coerce(snn_timesteps)
        constant = schedule.constant_timesteps
        timesteps = constant if constant is not None else str(schedule)
    return build_report(snn_counts, ann_counts, timesteps, num_images, energy_model, mean_timesteps=mean_t)
