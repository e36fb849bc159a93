"""What delta spikes across denoising steps save: energy of calibrated spiking networks counted both ways.

Consecutive denoising steps feed the UNet nearly the same image, so most neurons fire nearly the same spike
train at consecutive UNet evaluations. With delta spikes a link from a neuron to a weight layer sends the
change of each time step's spike count from the previous evaluation, and the layer adds the weights times
that change to the input currents it kept (exact: the layer is linear; ``spiking_diffusers.energy.accounting``).
The samples do not change, only the count; so this script only counts: for each saved QCFS network
(``--qcfs``, e.g. a ``benchmarks/low_t.py --save-dir`` row) it converts at the T the name says (``-T16``, else
``-T``), samples ``--num-images`` with DDIM at each ``--steps`` and prints SNN / ANN energy and the spike-driven
share with every spike sent as fired and with delta spikes, and the ratio of accumulates between the two.

    OMP_NUM_THREADS=2 python benchmarks/delta_spikes.py --qcfs DIR[,DIR...] [--model DIR] [--steps 10,20,50]
                                                       [-T 4] [--num-images 4] [--nonlinear-steps 3]
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import click
import torch

from spiking_diffusers.converter import QCFSUNet2DModel, SpikingUNet2DModel
from spiking_diffusers.energy.measure import measure_energy
from spiking_diffusers.loading import load_model
from spiking_diffusers.pipelines import make_scheduler


def spike_steps_of(path: Path, default: int) -> int:
    """The T a saved row was calibrated for: the ``-T<N>`` suffix of its directory name, else ``default``."""
    match = re.search(r"-T(\d+)$", path.name)
    return int(match.group(1)) if match else default


def count_both(snn, ann, scheduler_config: dict, steps: int, num_images: int, seed: int) -> list[dict]:
    """The energy totals of one sampling run counted with every spike sent, then with delta spikes."""
    return [
        measure_energy(
            snn, ann, make_scheduler("ddim", scheduler_config), steps, num_images, seed, delta_spikes=delta
        ).totals()
        for delta in (False, True)
    ]


@click.command()
@click.option("--qcfs", "qcfs_dirs", required=True, help="Saved QCFS networks, comma-separated.")
@click.option("--model", default=None, help="The ANN they came from (default: the shipped digits DDPM).")
@click.option("-T", "--spike-steps", "timesteps", default=4, help="T of a directory whose name has no -T<N>.")
@click.option("--steps", default="10,20,50", help="DDIM steps of the counted runs, comma-separated.")
@click.option("--num-images", default=4, help="Images sampled per counted run.")
@click.option("--nonlinear-steps", default=None, type=int, help="E: real-valued ops at E of the T steps.")
@click.option("--seed", default=0)
def main(qcfs_dirs, model, timesteps, steps, num_images, nonlinear_steps, seed) -> None:
    loaded = load_model(model, "cpu")
    scheduler_config = dict(loaded.scheduler.config)
    lines = [
        "| network | T | E | DDIM steps | energy, every spike | energy, delta spikes | ACs delta / every "
        "| spike-driven, every / delta |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for directory in [Path(d.strip()) for d in qcfs_dirs.split(",") if d.strip()]:
        qnet = QCFSUNet2DModel.from_pretrained(directory).eval()
        T = spike_steps_of(directory, timesteps)
        snn = SpikingUNet2DModel.from_qcfs(qnet, spike_steps=T, nonlinear_steps=nonlinear_steps)
        for n in [int(s) for s in steps.split(",")]:
            start = time.perf_counter()
            every, delta = count_both(snn, loaded.unet, scheduler_config, n, num_images, seed)
            lines.append(
                f"| {directory.name} | {T} | {nonlinear_steps or T} | {n} | {every['energy_ratio_snn_over_ann']:.2f} "
                f"| {delta['energy_ratio_snn_over_ann']:.2f} "
                f"| {delta['snn_acs_per_step'] / every['snn_acs_per_step']:.2f} "
                f"| {every['spike_driven_fraction']:.1%} / {delta['spike_driven_fraction']:.1%} |"
            )
            click.echo(f"{lines[-1]}  ({time.perf_counter() - start:.0f} s)", err=True)
    click.echo(
        f"\nSNN / ANN energy per denoising step, {num_images} images, seed {seed}, "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
