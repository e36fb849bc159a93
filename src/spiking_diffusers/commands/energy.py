"""``sdm-energy``: how much of a spiking UNet's work is driven by spikes, and its energy against the ANN.

The spiking network samples real images with a diffusers scheduler while every layer's work is counted
(see :mod:`spiking_diffusers.energy`); the ANN's MACs are counted on a forward pass of the same
architecture. The output directory holds ``energy.json`` (every layer, every site, the totals),
``firing_rates.png`` and ``energy_breakdown.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..calibration.calibrate import CalibrationConfig
from ..cli import (
    BoundedInt,
    CommandError,
    FiniteFloat,
    TScheduleParam,
    atomic_directory,
    calibration_config,
    calibration_options,
    check_guidance,
    check_output,
    check_scheduler_steps,
    check_t_schedule,
    conversion_source,
    delta_spikes_option,
    device_option,
    get_device,
    model_option,
    option_given,
    output_options,
    residual_spikes_option,
    resolve_class_labels,
    sdm_command,
)
from ..converter import convert
from ..energy.measure import measure_energy
from ..energy.plots import plot_energy_breakdown, plot_firing_rates
from ..energy.report import EnergyModel, EnergyReport, format_summary, format_table
from ..loading import LoadedModel, load_model
from ..pipelines import SCHEDULERS, TSchedule, make_scheduler

EXAMPLES = """
\b
Examples:
  sdm-energy --output energy                                # the shipped model, calibrated as sdm-convert does
  sdm-energy --model digits-snn --timesteps 8 --output energy-t8      # a model saved by sdm-convert
  sdm-energy --model google/ddpm-cifar10-32 --no-calibrate --steps 20 --num-images 1 --output cifar-energy
  sdm-energy --steps 20 -T 4,16x3 --output energy-sched     # T schedule: T = 16 for the last 3 steps, mean 5.8
"""


@sdm_command("sdm-energy", epilog=EXAMPLES)
@model_option(
    "Hub id or local directory of an ANN, QCFS or spiking model; an ANN or QCFS model is converted first "
    "(IF neurons, compensated GroupNorm/attention). Default: the digits DDPM shipped in the package."
)
@output_options("Directory for energy.json and the plots.")
@click.option("--spike-steps", "--timesteps", "-T", "timesteps", default="4", type=TScheduleParam(),
              metavar="T | SCHEDULE",
              help="SNN time steps T per UNet call (for a spiking model: its own T unless given), or a T schedule: "
              "4,16x3 is T = 16 for the last 3 denoising steps and 4 for the others.")  # fmt: skip
@click.option("--levels", "-L", default=None, type=BoundedInt("levels"),
              help="QCFS levels L of an ANN [default: T, or the T most steps of a schedule take].")  # fmt: skip
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="ddim", help="Sampler of the run.")
@click.option("--steps", default=50, type=click.IntRange(min=1), help="Denoising steps of the sampling run.")
@click.option("--num-images", default=4, type=BoundedInt("num_images"), help="Images sampled while counting.")
@click.option("--mac-pj", default=4.6, type=FiniteFloat(min=0), help="Energy per MAC (pJ).")
@click.option("--ac-pj", default=0.9, type=FiniteFloat(min=0), help="Energy per AC (pJ).")
@click.option("--rows", default=30, type=click.IntRange(min=1), help="Table rows to print (all go to energy.json).")
@click.option("--seed", default=0, type=BoundedInt("seed"), help="Seed of the sampling run and the threshold probes.")
@residual_spikes_option()
@delta_spikes_option()
@calibration_options
@click.option(
    "--guidance-scale",
    default=1.0,
    type=FiniteFloat(0),
    help="Label-conditional models: classifier-free guidance of the counted run (1: none; else two UNet "
    "evaluations per step, both counted). Labels 0, 1, ... in turn.",
)
@device_option()
def main(
    model, output, overwrite, timesteps, levels, scheduler, steps, num_images, mac_pj, ac_pj, rows, seed,
    residual_spikes, delta_spikes, calibrate, calibration_samples, calibration_steps, snn_steps, calibration_set_size,
    calibration_budget, guidance_scale, device,
) -> None:  # fmt: skip
    """Count spikes, ACs and MACs layer by layer over a real sampling run, and compare the energy to the ANN."""
    check_output(output, overwrite, {"--model": model})  # before the measurement, which takes minutes
    check_t_schedule(timesteps, steps, "--spike-steps")
    device = get_device(device)
    loaded = load_model(model, device)
    sampler = make_scheduler(scheduler, dict(loaded.scheduler.config))
    check_scheduler_steps(sampler, steps, "--steps")
    calibration = calibration_config(
        calibrate,
        calibration_samples,
        calibration_steps,
        snn_steps,
        set_size=calibration_set_size,
        budget_minutes=calibration_budget,
    )
    resolve_class_labels(None, loaded)  # a text-conditioned model has no conditioning to sample with here
    check_guidance([guidance_scale], loaded)
    snn, ann, snn_timesteps, measured = _networks(loaded, timesteps, levels, seed, residual_spikes, calibration)
    report = measure_energy(
        snn,
        ann,
        sampler,
        steps,
        num_images=num_images,
        seed=seed,
        snn_timesteps=snn_timesteps,
        energy_model=EnergyModel(mac_pj=mac_pj, ac_pj=ac_pj),
        label_tokens=loaded.label_tokens,
        guidance_scale=guidance_scale,
        delta_spikes=delta_spikes if delta_spikes is not None or loaded.kind == "snn" else True,
    )
    settings = {
        "source": loaded.source,
        "source_kind": loaded.kind,
        "measured": measured,
        "timesteps": report.timesteps,
        "mean_timesteps": report.mean_timesteps,
        "levels": snn.config.levels,
        "neuron": snn.config.neuron,
        "nonlinear_mode": snn.config.nonlinear_mode,
        "threshold_form": snn.config.threshold_form,
        "residual_spikes": bool(snn.config.residual_spikes),
        "delta_spikes": report.delta_spikes,
        "scheduler": scheduler,
        "steps": steps,
        "num_images": num_images,
        "seed": seed,
        "guidance_scale": guidance_scale if loaded.label_tokens is not None else None,
    }
    with atomic_directory(output, overwrite=overwrite) as staging:
        _write(report, settings, Path(staging))
    click.echo(format_table(report, max_rows=rows))
    click.echo()
    click.echo(format_summary(report))
    click.echo(f"Wrote {output}/energy.json, firing_rates.png, energy_breakdown.png")


def _networks(
    loaded: LoadedModel,
    timesteps: int | TSchedule,
    levels: int | None,
    seed: int,
    residual_spikes: bool | None,
    calibration: CalibrationConfig | None,
):
    """``(snn, ann, snn_timesteps, measured)``: the spiking network to measure, a network with the ANN's
    layers, the T override of the run (a spiking model given with ``--timesteps``, or any T schedule), and
    what is measured.

    An ANN or a QCFS model becomes the spiking network ``sdm-convert`` would make of it (an ANN is calibrated
    first unless ``--no-calibrate``), at T or at the T most steps of a schedule take; a spiking model is
    measured as it is. Only the ANN's MAC count is used, which depends on its architecture alone, so without
    the original a freshly initialised ``UNet2DModel`` of the same config stands in for it.
    """
    schedule = timesteps if isinstance(timesteps, TSchedule) else None
    base = schedule.base if schedule is not None else timesteps
    if loaded.kind == "snn":
        snn = loaded.unet
        if residual_spikes is not None and residual_spikes != bool(snn.config.residual_spikes):
            raise CommandError(f"--residual-spikes: {loaded.source} is a spiking model; it keeps its own setting.", 2)
        click.echo(f"Measuring a spiking model as given ({loaded.source})")
        ann = snn.unet_class.from_config(snn.config.unet_config).to(snn.device).eval()
        return snn, ann, timesteps if option_given("timesteps") else None, "a spiking model, as given"
    source = conversion_source(loaded, base, calibration, levels=levels, residual_spikes=residual_spikes, seed=seed)
    qnet = source.qnet
    ann = source.ann or qnet.unet_class.from_config(qnet.config.unet_config).to(loaded.unet.device).eval()
    return convert(source.qnet, spike_steps=base), ann, schedule, source.description


def _write(report: EnergyReport, settings: dict, directory: Path) -> None:
    (directory / "energy.json").write_text(json.dumps({"settings": settings, **report.to_dict()}, indent=2) + "\n")
    plot_firing_rates(report, directory / "firing_rates.png")
    plot_energy_breakdown(report, directory / "energy_breakdown.png")
