"""Measuring the work on real inputs: the SNN over a sampling run with a diffusers scheduler, the ANN on
one forward pass (its MAC count does not depend on the input).

With a T schedule (T per denoising step) the counts follow it, and the report states the mean T per UNet
evaluation, taken from the calls the SNN actually received. A label-conditional SNN samples labels
``0, 1, ...`` through its ``label_tokens``, with classifier-free guidance when ``guidance_scale`` != 1 (each
denoising step then evaluates the UNet on twice the batch, and the report counts per UNet evaluation).
"""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin
from torch import nn

from ..converter.building import spatial_size
from ..converter.models import SpikingUNet2DModel
from ..converter.probes import conditioning_kwargs, move_kwargs
from ..label_tokens import LabelTokens
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
    label_tokens: LabelTokens | None = None,
    guidance_scale: float = 1.0,
    delta_spikes: bool | None = None,
) -> Accounting:
    """Count the work of ``snn`` while it samples ``num_images`` images in ``steps`` denoising steps
    (``snn_timesteps``: a T or a T schedule, as the pipeline takes it; ``label_tokens`` and ``guidance_scale``
    for a label-conditional SNN; ``delta_spikes``: count delta spikes, default: as the model says)."""
    return _count_sampling(
        snn, scheduler, steps, num_images, seed, snn_timesteps, label_tokens, guidance_scale, delta_spikes
    )[0]


def uses_delta_spikes(snn: nn.Module, delta_spikes: bool | None = None) -> bool:
    """Whether a count of ``snn`` uses delta spikes: ``delta_spikes`` if given, else the model's setting."""
    return bool(getattr(snn.config, "delta_spikes", False)) if delta_spikes is None else bool(delta_spikes)


def _count_sampling(
    snn, scheduler, steps, num_images, seed, snn_timesteps, label_tokens=None, guidance_scale=1.0, delta_spikes=None
) -> tuple[Accounting, float]:
    """The counts of a sampling run, and the mean T over its UNet evaluations (weighted by batch size)."""
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=scheduler, label_tokens=label_tokens)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    calls: list[tuple[int, int]] = []  # (T, batch) of every UNet evaluation

    def record(module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        given = kwargs.get("spike_steps")
        calls.append((int(module.config.timesteps) if given is None else int(given), sample.shape[0]))

    hook = snn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with OperationCounter(snn, delta_spikes=uses_delta_spikes(snn, delta_spikes)) as counter:
            pipe(
                batch_size=num_images,
                generator=generator,
                num_inference_steps=steps,
                output_type="pt",
                spike_steps=snn_timesteps,
                **_labels(label_tokens, num_images, guidance_scale),
            )
    finally:
        hook.remove()
    return counter.accounting, mean_timesteps([t for t, _ in calls], [b for _, b in calls])


def _labels(label_tokens: LabelTokens | None, num_images: int, guidance_scale: float) -> dict:
    """The pipeline's conditioning arguments: labels ``0, 1, ...`` (and the guidance) with label tokens."""
    if label_tokens is None:
        return {"guidance_scale": guidance_scale} if guidance_scale != 1 else {}
    labels = torch.arange(num_images) % label_tokens.config.num_classes
    return {"class_labels": labels, "guidance_scale": guidance_scale}


@torch.no_grad()
def count_forward(model: nn.Module, timestep: int = 500) -> Accounting:
    """Count the work of one forward pass of ``model`` on one random input (with random conditioning for a
    conditional UNet: the work does not depend on its values)."""
    config = inner_unet(model).config
    height, width = spatial_size(config.sample_size)
    param = next(model.parameters())
    sample = torch.randn(1, config.in_channels, height, width, device=param.device, dtype=param.dtype)
    kwargs = move_kwargs(conditioning_kwargs(dict(config), 1, torch.Generator().manual_seed(0)), sample)
    with OperationCounter(model) as counter:
        model(sample, torch.tensor([timestep], device=param.device), **kwargs)
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
    label_tokens: LabelTokens | None = None,
    guidance_scale: float = 1.0,
    delta_spikes: bool | None = None,
) -> EnergyReport:
    """The energy report of a spiking UNet against its ANN over one real sampling run of the SNN.

    ``snn_timesteps`` overrides the model's T for this run: one T, or a T schedule (T per denoising step;
    the report then states the schedule and its mean T, and every per-step figure is a mean over the steps).
    ``label_tokens`` and ``guidance_scale``: a label-conditional SNN samples labels 0, 1, ... with them.
    ``delta_spikes`` counts the spike-driven layers with delta spikes (changes from the previous UNet
    evaluation, see :mod:`.accounting`); default: as the model's ``delta_spikes`` setting says.
    """
    delta = uses_delta_spikes(snn, delta_spikes)
    snn_counts, mean_t = _count_sampling(
        snn, scheduler, steps, num_images, seed, snn_timesteps, label_tokens, guidance_scale, delta
    )
    ann_counts = count_forward(ann)
    if snn_timesteps is None:
        timesteps: int | str = int(snn.config.timesteps)
    else:
        schedule = TSchedule.coerce(snn_timesteps)
        constant = schedule.constant_timesteps
        timesteps = constant if constant is not None else str(schedule)
    return build_report(
        snn_counts, ann_counts, timesteps, num_images, energy_model, mean_timesteps=mean_t, delta_spikes=delta
    )
