"""Energy and spike accounting of the shipped digits model and the ddpm-cifar10-32 architecture at T = 4, 8.

Each model is quantized (L = T, thresholds at the 99.9th percentile of noised probes: no calibration),
converted (IF neurons, compensated GroupNorm / attention, batched execution) and sampled with DDIM while
every layer's work is counted (``spiking_diffusers.energy``). The cifar10 architecture has random weights:
its firing rates are those of an untrained network, its operation counts those of the real model.

``--burst B`` quantizes at L = B x T and converts to burst neurons (and burst encoders), as the default recipe
does with B = 4. With ``--residual-spikes`` the QCFS networks carry signed input encoders on the convolutions
that read the residual stream and on the attention projections (``quantize(..., residual_spikes=True)``), so the
spiking networks feed those layers spikes.

``--delta-spikes`` counts every run a second time with delta spikes (changes from the previous UNet
evaluation; the same samples): a second row per model and T.

    python benchmarks/energy.py [--steps 20] [--num-images 2] [--timesteps 4 8] [--models digits cifar10]
                                [--residual-spikes] [--burst 4] [--delta-spikes]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
from diffusers import DDPMScheduler, UNet2DModel

from spiking_diffusers import convert
from spiking_diffusers.architectures import DDPM_CIFAR10_32
from spiking_diffusers.calibration.policy import calibrate_or_quantize
from spiking_diffusers.energy.measure import measure_energy
from spiking_diffusers.energy.report import OP_CLASSES, EnergyReport
from spiking_diffusers.loading import load_model, shipped_model_path
from spiking_diffusers.pipelines import make_scheduler


def load(name: str) -> tuple[UNet2DModel, dict] | None:
    """The ANN and its scheduler config, or ``None`` when the shipped model is not there."""
    if name == "cifar10":
        torch.manual_seed(0)
        return UNet2DModel(**DDPM_CIFAR10_32).eval(), dict(DDPMScheduler().config)
    if not (Path(shipped_model_path()) / "model_index.json").is_file():
        return None
    loaded = load_model(None)
    return loaded.unet, dict(loaded.scheduler.config)


def row(name: str, report: EnergyReport, residual_spikes: bool) -> dict:
    totals = report.totals()
    shares = {name: snn / report.snn_energy_pj for name, (snn, _) in report.breakdown_pj().items()}
    label = f"{name}, residual spikes" if residual_spikes else name
    label += ", delta spikes" if report.delta_spikes else ""
    return {"model": label, "residual_spikes": residual_spikes, **totals, "snn_energy_share_by_class": shares}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | T | spike-driven ops (all / conv+linear) | firing rate | SNN ACs (M) | SNN MACs (M) | ANN MACs (M) "
        "| SNN mJ / step | ANN mJ / step | SNN / ANN | SNN mJ / image | ANN mJ / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['timesteps']} | {r['spike_driven_fraction']:.1%} / "
            f"{r['weight_layer_spike_driven_fraction']:.1%} | {r['mean_input_firing_rate']:.3f} | "
            f"{r['snn_acs_per_step'] / 1e6:.1f} | {r['snn_macs_per_step'] / 1e6:.1f} | "
            f"{r['ann_macs_per_step'] / 1e6:.1f} | {r['snn_energy_mj_per_step']:.3f} | "
            f"{r['ann_energy_mj_per_step']:.3f} | "
            f"{r['energy_ratio_snn_over_ann']:.2f} | {r['snn_energy_mj_per_image']:.2f} | "
            f"{r['ann_energy_mj_per_image']:.2f} |"
        )
    lines += ["", "| model | T | " + " | ".join(OP_CLASSES) + " |", "|---|---|" + "---|" * len(OP_CLASSES)]
    for r in rows:
        shares = " | ".join(f"{r['snn_energy_share_by_class'][name]:.1%}" for name in OP_CLASSES)
        lines.append(f"| {r['model']} | {r['timesteps']} | {shares} |")
    return "\n".join(lines)


@click.command()
@click.option("--models", multiple=True, default=("digits", "cifar10"), type=click.Choice(["digits", "cifar10"]))
@click.option("--timesteps", multiple=True, default=(4, 8), type=int)
@click.option("--steps", default=20, help="DDIM denoising steps of the counted sampling run.")
@click.option("--num-images", default=2, help="Images sampled while counting.")
@click.option("--output", default=None, type=click.Path(), help="Also write the rows as JSON here.")
@click.option("--residual-spikes/--no-residual-spikes", default=False, help="Spike encoders on real-input layers.")
@click.option("--burst", default=1, help="Spikes per step B of the neurons and encoders (L = B x T).")
@click.option("--delta-spikes", is_flag=True, help="Also count each run with delta spikes (its own row).")
def main(models, timesteps, steps, num_images, output, residual_spikes, burst, delta_spikes) -> None:
    torch.set_num_threads(1)
    rows = []
    for name in models:
        model = load(name)
        if model is None:
            click.echo(f"{name}: the shipped model is not in the package; skipped")
            continue
        ann, scheduler_config = model
        for T in timesteps:
            start = time.perf_counter()
            qnet = calibrate_or_quantize(ann, levels=burst * T, timesteps=T, residual_spikes=residual_spikes).qnet
            snn = convert(qnet, spike_steps=T, burst=burst)
            scheduler = make_scheduler("ddim", scheduler_config)
            for delta in (False, True) if delta_spikes else (False,):
                report = measure_energy(snn, ann, scheduler, steps, num_images=num_images, seed=0, delta_spikes=delta)
                rows.append(row(name, report, residual_spikes))
            click.echo(f"{name} T={T}: {time.perf_counter() - start:.0f} s", err=True)
    click.echo(markdown(rows))
    if output:
        Path(output).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
