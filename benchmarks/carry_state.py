"""Carried spiking state across denoising steps: the go / no-go measurement of issue 14.

A fresh simulation starts every UNet call with membranes at phi * theta and throws them away after T time
steps. "Carried" keeps every IF neuron's membrane from the end of one UNet call as the start of the next one
of the same sampling run (sigma-delta across calls: a call's quantization residual is fed forward instead of
lost); the compensated GroupNorm / attention sums restart every call; the first call starts at phi * theta.
The mechanism lives here, in the benchmark, on purpose: the measurement decided against adding it to the
package (docs/benchmarks.md, "Carried state"), and no unused option stays behind.

For each sampler setting, the ANN, fresh SNNs at T = 1, 2, 4, 8 and carried SNNs at T = 1, 2, 4 sample from
the same noise (each at L = T: plain IF neurons, one spike per step, default recipe otherwise). Printed: FD
ratio to the ANN +- the spread of 4 paired split ratios, paired PSNR, SNN / ANN energy of a counted run, and
sampling wall time relative to the ANN. ``--residual-only`` carries only the quantization residual.

    OMP_NUM_THREADS=2 python benchmarks/carry_state.py [--qcfs-dir DIR] [--samplers ddim:20,ddim:50,ddpm:20]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from spiking_diffusers.calibration.calibrate import CalibrationConfig
from spiking_diffusers.calibration.data import default_cache_dir
from spiking_diffusers.calibration.policy import calibrate_or_quantize
from spiking_diffusers.converter import QCFSUNet2DModel, SpikingUNet2DModel
from spiking_diffusers.converter.neurons import SpikingNeuron
from spiking_diffusers.digits import load_digit_images
from spiking_diffusers.energy.measure import measure_energy
from spiking_diffusers.evaluation.sampling import sample_variant
from spiking_diffusers.evaluation.variants import Variant
from spiking_diffusers.loading import load_model
from spiking_diffusers.metrics import DigitFeatures, FrechetDistance, paired_psnr, reference_statistics
from spiking_diffusers.pipelines import make_scheduler


def carry_state(snn: SpikingUNet2DModel, residual_only: bool = False) -> SpikingUNet2DModel:
    """Make ``snn`` (step-wise execution) keep its neurons' membranes from one UNet call to the next; a call
    whose diffusion timestep is not below the previous call's starts a new sampling run and fresh state.
    ``residual_only`` carries the membrane clamped to [0, theta): the quantization residual alone, not the
    charge a silent (negative input) or saturated neuron piles up over the run."""
    neurons = [m for m in snn.modules() if isinstance(m, SpikingNeuron)]
    last = {"t": None}

    def stash(neuron, reset=SpikingNeuron.reset_state):
        if neuron.membrane is not None:
            carried = neuron.membrane.detach().clone()
            if residual_only:
                carried = torch.minimum(carried.clamp_min(0), neuron.firing_threshold(carried).detach() * (1 - 1e-6))
            neuron.carried = carried
        reset(neuron)

    def start(neuron, current, firing=None, initial=SpikingNeuron.initial_memory):
        carried = getattr(neuron, "carried", None)
        if carried is not None and carried.shape == current.shape:
            return {"membrane": carried.clone()}
        return initial(neuron, current, firing)

    for neuron in neurons:
        neuron.carried = None
        neuron.reset_state = stash.__get__(neuron)
        neuron.initial_memory = start.__get__(neuron)

    def new_run(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(torch.as_tensor(timestep).flatten()[0])
        if last["t"] is None or t >= last["t"]:
            for neuron in neurons:
                neuron.carried = None
        last["t"] = t

    snn.register_forward_pre_hook(new_run, with_kwargs=True)
    snn.set_execution("stepwise")
    return snn


def qcfs_at(levels: int, loaded, qcfs_dir: str | None) -> QCFSUNet2DModel:
    """The QCFS network of plain IF neurons (B = 1) at L = T = ``levels``, calibrated with the default recipe
    otherwise (from ``qcfs_dir`` when saved there, in ``benchmarks/low_t.py``'s layout)."""
    names = ["qcfs-plain"] if levels == 4 else [f"qcfs-plain-T{levels}"]
    for name in names if qcfs_dir else []:
        if (Path(qcfs_dir) / name).is_dir():
            return QCFSUNet2DModel.from_pretrained(Path(qcfs_dir) / name).eval()
    config = CalibrationConfig(burst=1)
    start = time.perf_counter()
    qnet = calibrate_or_quantize(
        loaded.unet,
        levels,
        config.per_channel,
        timesteps=levels,
        scheduler_config=dict(loaded.scheduler.config),
        calibration=config,
        progress=False,
    ).qnet
    if qcfs_dir:  # in low_t.py's layout, so that its rows reuse it
        qnet.save_pretrained(Path(qcfs_dir) / names[0])
        seconds = {"seconds": time.perf_counter() - start}
        (Path(qcfs_dir) / names[0] / "calibration_seconds.json").write_text(json.dumps(seconds))
    return qnet


@click.command(context_settings={"show_default": True})
@click.option(
    "--qcfs-dir", default=None, help="Saved default-calibrated QCFS networks (benchmarks/low_t.py --save-dir)."
)
@click.option("--samplers", default="ddim:20,ddim:50,ddpm:20", help="scheduler:steps settings.")
@click.option("--fresh", default="1,2,4,8", help="T of the fresh simulations.")
@click.option("--carried", default="1,2,4", help="T of the carried-state simulations.")
@click.option("--residual-only", is_flag=True, help="Carry only the membrane's quantization residual in [0, theta).")
@click.option("--num-images", default=1000)
@click.option("--fd-splits", default=4)
@click.option("--seed", default=0)
@click.option("--output", type=click.Path(dir_okay=False), default=None)
def main(qcfs_dir, samplers, fresh, carried, residual_only, num_images, fd_splits, seed, output) -> None:
    loaded = load_model(None, "cpu")
    scheduler_config = dict(loaded.scheduler.config)
    extractor = DigitFeatures()
    frechet = FrechetDistance(
        extractor, reference_statistics(extractor, load_digit_images(size=16, split="all"), default_cache_dir())
    )
    fresh_t = [int(t) for t in fresh.split(",") if t]
    carried_t = [int(t) for t in carried.split(",") if t]
    qnets = {t: qcfs_at(t, loaded, qcfs_dir) for t in sorted(set(fresh_t) | set(carried_t))}
    size = num_images // fd_splits
    rows = []
    for setting in samplers.split(","):
        name, steps = setting.split(":")
        steps = int(steps)
        variants = [("ANN", loaded.unet, None, False)]
        variants += [(f"fresh T={t}", qnets[t], t, False) for t in fresh_t]
        kind = "carried residual" if residual_only else "carried"
        variants += [(f"{kind} T={t}", qnets[t], t, True) for t in carried_t]
        ann_images = ann_seconds = ann_fds = None
        for label, net, T, carry in variants:
            if T is None:
                unet, kind = net, "ann"
            else:
                unet = SpikingUNet2DModel.from_qcfs(net, spike_steps=T, execution="stepwise")
                unet = carry_state(unet, residual_only) if carry else unet
                kind = "snn"
            variant = Variant(label, kind, unet, timesteps=T)
            images, seconds = sample_variant(
                variant, make_scheduler(name, scheduler_config), num_images, steps, seed, 100, progress=False
            )
            fds = np.array([frechet(images[k * size : (k + 1) * size]) for k in range(fd_splits)])
            fd = frechet(images)
            if ann_images is None:
                ann_images, ann_seconds, ann_fds, ann_fd = images, seconds, fds, fd
                energy = None
            else:
                energy = measure_energy(
                    unet, loaded.unet, make_scheduler(name, scheduler_config), steps, num_images=2, seed=seed
                ).totals()["energy_ratio_snn_over_ann"]
            ratios = fds / ann_fds
            row = {
                "sampler": setting,
                "network": label,
                "fd": fd,
                "fd_ratio": fd / ann_fd,
                "split_ratio_mean": float(ratios.mean()),
                "split_ratio_std": float(ratios.std(ddof=1)),
                "psnr": None if T is None else float(paired_psnr(images, ann_images).mean()),
                "energy_ratio": energy,
                "time_ratio": seconds / ann_seconds,
            }
            rows.append(row)
            click.echo(json.dumps(row), err=True)
            if output:
                Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    click.echo("| sampler | network | FD ratio | split ratio mean +- std | PSNR dB | SNN/ANN energy | time / ANN |")
    click.echo("|---|---|---|---|---|---|---|")
    for r in rows:
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        energy = "-" if r["energy_ratio"] is None else f"{r['energy_ratio']:.2f}"
        click.echo(
            f"| {r['sampler']} | {r['network']} | {r['fd_ratio']:.2f} | {r['split_ratio_mean']:.2f} +- "
            f"{r['split_ratio_std']:.2f} | {psnr} | {energy} | {r['time_ratio']:.1f} |"
        )


if __name__ == "__main__":
    main()
