"""What the default calibration recipe costs on this CPU: unit costs measured on the shipped digits DDPM and on
the random-weight ddpm-cifar10-32 architecture (the headline ``sdm-convert --model google/ddpm-cifar10-32``),
extrapolated to the whole recipe.

For each model: the original UNet's forward (per input), ``--steps`` QCFS distillation steps and
``--snn-steps`` SNN fine-tuning steps at T = 4 on a calibration set with stored targets (as the recipe trains;
each timed after one warm-up step), the MSE threshold search from the channel count. A probe batch smaller
than the recipe's (``--cifar-batch``, ``--cifar-snn-batch``) is extrapolated linearly per input, which
overestimates a little (small batches use the cores less well). The default recipe's phases
(:func:`spiking_diffusers.calibration.cost.plan_phases`, with the images still to draw) are then priced, and
so is the recipe before commit 37087ce (2000 steps, the teacher run at every step, no calibration set, no
sweep). Prints the machine (``lscpu``), the thread count and a table.

    OMP_NUM_THREADS=1 python benchmarks/calibration_cost.py [--steps 3] [--snn-steps 1] [--models digits,cifar10]
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import time

import click
import torch
from diffusers import DDPMScheduler, UNet2DModel

from spiking_diffusers.architectures import DDPM_CIFAR10_32
from spiking_diffusers.calibration.calibrate import CalibrationConfig
from spiking_diffusers.calibration.cost import MSE_SEARCH_S_PER_CHANNEL, UnitCosts, plan_phases
from spiking_diffusers.calibration.data import CalibrationSet
from spiking_diffusers.calibration.distill import DistillSettings, distill
from spiking_diffusers.converter import convert, quantize
from spiking_diffusers.converter.building import spatial_size
from spiking_diffusers.loading import load_model

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
OLD_DISTILL_STEPS = 2000


def machine() -> str:
    """``lscpu``'s model name, core count and the vector-instruction flags that matter for float32 convolutions."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", text, flags=re.MULTILINE))
    flags = set(fields.get("Flags", "").split())
    present = [flag for flag in FLAGS if flag in flags] or ["none of " + ", ".join(FLAGS)]
    return f"{fields.get('Model name', '?')}, {fields.get('CPU(s)', '?')} CPUs, flags: {' '.join(present)}"


def step_times(student, teacher, data, settings: DistillSettings) -> list[float]:
    """Seconds of each of ``settings.steps`` steps of :func:`distill`."""
    stamps = [time.perf_counter()]
    distill(student, teacher, data, settings, progress=False, on_step=lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def measure(unet: UNet2DModel, config: CalibrationConfig, batch: int, snn_batch: int, steps: int, snn_steps: int):
    """Unit costs at the recipe's batch sizes (extrapolated per input from ``batch`` / ``snn_batch``)."""
    unet = unet.eval()
    height, width = spatial_size(unet.config.sample_size)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, unet.config.in_channels, height, width, generator=generator) * 2 - 1
    size = batch * (steps + 1)
    data = CalibrationSet.draw(x0, DDPMScheduler(), size, generator)
    data.targets = torch.randn(data.x_t.shape, generator=generator)  # timing only: the values do not matter

    x, t = data.x_t[:batch], data.timesteps[:batch]
    with torch.no_grad():
        unet(x, t)
        start = time.perf_counter()
        for _ in range(2):
            unet(x, t)
    teacher_s = (time.perf_counter() - start) / 2 / batch

    qnet = quantize(unet, levels=config.resolved_levels, per_channel=config.per_channel, init=None)
    distill_settings = dataclasses.replace(config.distill, steps=steps + 1, batch_size=batch)
    times = step_times(qnet, unet, data, distill_settings)[1:]  # the first step warms up
    student_step_s = sum(times) / len(times) / batch * config.distill.batch_size

    snn = convert(qnet, timesteps=config.timesteps, neuron=config.neuron)
    snn_settings = dataclasses.replace(config.snn, steps=snn_steps + 1, batch_size=snn_batch)
    times = step_times(snn, unet, data, snn_settings)[1:]
    snn_step_s = sum(times) / len(times) / snn_batch * config.snn.batch_size
    channels = sum(unit.channels for unit in qnet.sites().values())
    return UnitCosts(teacher_s, student_step_s, snn_step_s, channels, torch.get_num_threads(), "cpu")


def old_recipe_s(config: CalibrationConfig, costs: UnitCosts) -> float:
    """The recipe before the calibration set: 2000 steps with the teacher's forward in every step, fresh noise."""
    phases = {p.name: p.seconds for p in plan_phases(config, costs, samples_cached=False)}
    distill_s = OLD_DISTILL_STEPS * (costs.student_step_s + costs.teacher_s * config.distill.batch_size)
    snn_s = config.snn.steps * (costs.snn_step_s + costs.teacher_s * config.snn.batch_size)
    return phases["samples"] + phases["statistics"] + distill_s + snn_s


@click.command(context_settings={"show_default": True})
@click.option("--models", default="digits,cifar10", help="Which models (comma-separated: digits, cifar10).")
@click.option("--steps", default=3, help="Timed QCFS distillation steps (after one warm-up step).")
@click.option("--snn-steps", default=1, help="Timed SNN fine-tuning steps (after one warm-up step).")
@click.option("--cifar-batch", default=4, help="Probe batch of the cifar10 distillation steps (recipe: 32).")
@click.option("--cifar-snn-batch", default=1, help="Probe batch of the cifar10 SNN steps (recipe: 16).")
def main(models: str, steps: int, snn_steps: int, cifar_batch: int, cifar_snn_batch: int) -> None:
    config = CalibrationConfig()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    click.echo(f"Machine: {machine()}; torch threads: {torch.get_num_threads()}; load average at start: {load}")
    click.echo(
        f"Default recipe: {config.num_samples} images x {config.sampler_steps} DDIM steps, calibration set "
        f"{config.set_size}, {config.distill.steps} distillation steps of {config.distill.batch_size}, "
        f"{config.snn.steps} SNN steps of {config.snn.batch_size} at T = {config.timesteps}, sweep of "
        f"{config.sweep_images} images.\n"
    )
    rows = []
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        start = time.perf_counter()
        if name == "digits":
            unet, batch, snn_batch = load_model(None, "cpu").unet, config.distill.batch_size, config.snn.batch_size
        elif name == "cifar10":
            torch.manual_seed(0)
            unet, batch, snn_batch = UNet2DModel(**DDPM_CIFAR10_32), cifar_batch, cifar_snn_batch
        else:
            raise click.BadParameter(f"unknown model {name!r}", param_hint="--models")
        costs = measure(unet, config, batch, snn_batch, steps, snn_steps)
        phases = plan_phases(config, costs, samples_cached=False)
        total = sum(p.seconds for p in phases)
        rows.append((name, batch, snn_batch, costs, phases, total, old_recipe_s(config, costs)))
        click.echo(f"{name}: measured in {time.perf_counter() - start:.0f} s", err=True)

    click.echo(
        "| model | probe batch (distill / SNN) | teacher forward, ms per input | distillation step, s (batch 32) | "
        "SNN step, s (batch 16, T = 4) | default recipe, min | recipe before (2000 steps, teacher every step), min |"
    )
    click.echo("|---|---|---|---|---|---|---|")
    for name, batch, snn_batch, costs, _, total, old in rows:
        click.echo(
            f"| {name} | {batch} / {snn_batch} | {costs.teacher_s * 1e3:.2f} | {costs.student_step_s:.3f} | "
            f"{costs.snn_step_s:.3f} | {total / 60:.1f} | {old / 60:.1f} |"
        )
    click.echo("\nPer phase of the default recipe, minutes:")
    names = [p.name for p in rows[0][4]] if rows else []
    click.echo("| model | " + " | ".join(names) + " |")
    click.echo("|---|" + "---|" * len(names))
    for name, _, _, _, phases, _, _ in rows:
        click.echo(f"| {name} | " + " | ".join(f"{p.seconds / 60:.2f}" for p in phases) + " |")
    click.echo(f"\n(MSE threshold search: {MSE_SEARCH_S_PER_CHANNEL * 1e3:.2f} ms per channel, not measured here.)")


if __name__ == "__main__":
    main()
