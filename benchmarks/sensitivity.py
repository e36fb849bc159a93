"""How much noise-prediction error the sampler tolerates at the first denoising steps, against what the SNN has.

DDIM from the same noises as the ANN, with the ANN's noise prediction at the first ``--first`` steps replaced
by ``eps + r |eps| n / |n|`` (``n`` Gaussian per pixel: a relative error ``r`` of the size the spiking network
makes, in a random direction), the ANN elsewhere. Printed per ``r``: FD ratio to the unperturbed ANN's
samples, paired PSNR and the share of samples below 20 dB. With ``--qcfs``, the spiking network's own
relative error ``|eps_snn - eps| / |eps|`` at each of those steps, on the ANN's own DDIM states: where it
lies on that scale says how far a calibration has to go before the first steps stop costing samples.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity.py [--model DIR] [--qcfs DIR] [--first 5]
                                                       [--errors 0.02,0.03,0.05] [--num-images 1000]
"""

from __future__ import annotations

import click
import torch

from ddim_loop import ddim_samples, initial_noise
from spiking_diffusers.converter import QCFSUNet2DModel, SpikingUNet2DModel
from spiking_diffusers.digits import load_digit_images
from spiking_diffusers.loading import load_model
from spiking_diffusers.metrics import DigitFeatures, FrechetDistance, paired_psnr, reference_statistics
from spiking_diffusers.pipelines import make_scheduler

BATCH = 250


def relative(error: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample ``|error| / |reference|``."""
    return error.flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)


def sample(ann, scheduler_config: dict, num_images: int, steps: int, first: int, error: float) -> torch.Tensor:
    """DDIM samples in [-1, 1], the ANN's prediction at the first ``first`` steps off by a relative ``error``."""
    perturbation = torch.Generator().manual_seed(99)

    def predict(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        eps = ann(x, t).sample
        if i < first and error:
            noise = torch.randn(eps.shape, generator=perturbation)
            eps = eps + error * relative(eps, noise).reshape(-1, 1, 1, 1) * noise
        return eps

    return ddim_samples(ann.config, scheduler_config, num_images, steps, predict, BATCH)


@torch.no_grad()
def snn_errors(ann, snn, scheduler_config: dict, steps: int, first: int, count: int = 128) -> list[float]:
    """The SNN's mean relative noise-prediction error at each of the first ``first`` steps of the ANN's DDIM."""
    x = initial_noise(ann.config, range(count))
    scheduler = make_scheduler("ddim", scheduler_config)
    scheduler.set_timesteps(steps)
    errors = []
    for t in scheduler.timesteps[:first]:
        eps = ann(x, t).sample
        errors.append(relative(snn(x, t).sample - eps, eps).mean().item())
        x = scheduler.step(eps, t, x).prev_sample
    return errors


@click.command()
@click.option("--model", default=None, help="ANN directory (default: the shipped digits DDPM).")
@click.option("--qcfs", default=None, help="Also measure this saved QCFS network's SNN (e.g. a low_t.py row).")
@click.option("-T", "--spike-steps", "timesteps", default=4, help="The SNN's T.")
@click.option("--first", default=5, help="Perturb the first N denoising steps.")
@click.option("--errors", default="0.02,0.03,0.05", help="Relative errors r to try.")
@click.option("--num-images", default=1000)
@click.option("--steps", default=20, help="DDIM steps.")
def main(model, qcfs, timesteps, first, errors, num_images, steps) -> None:
    loaded = load_model(model, "cpu")
    ann = loaded.unet.eval()
    scheduler_config = dict(loaded.scheduler.config)
    extractor = DigitFeatures()
    real = load_digit_images(size=ann.config.sample_size)
    frechet = FrechetDistance(extractor, reference_statistics(extractor, real))
    reference = sample(ann, scheduler_config, num_images, steps, first, 0.0)
    reference_fd = frechet(reference)
    lines = ["| relative error at the first steps | FD ratio | paired PSNR | samples below 20 dB |"]
    lines.append("|---|---|---|---|")
    for error in [float(v) for v in errors.split(",") if v]:
        images = sample(ann, scheduler_config, num_images, steps, first, error)
        psnr = paired_psnr(images, reference)
        below = (psnr < 20).float().mean()
        ratio = frechet(images) / reference_fd
        lines.append(f"| {error:.3f} (random) | {ratio:.3f} | {psnr.mean():.1f} dB | {below:.1%} |")
        click.echo(lines[-1], err=True)
    if qcfs:
        snn = SpikingUNet2DModel.from_qcfs(QCFSUNet2DModel.from_pretrained(qcfs), spike_steps=timesteps)
        snn.set_execution("stepwise")  # on CPU faster than batched, same result
        measured = snn_errors(ann, snn, scheduler_config, steps, first)
        lines.append(f"| SNN at T = {timesteps}: {', '.join(f'{v:.3f}' for v in measured)} (per step) | | | |")
    click.echo(f"\nANN FD {reference_fd:.3f}, {num_images} samples, DDIM-{steps}, first {first} steps perturbed\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
