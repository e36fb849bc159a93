"""Where along the sampling trajectory the spiking network loses its samples' quality.

DDIM from the same noise as the ANN, with the SNN standing in for the ANN at one range of the denoising steps
only (``--ranges``; the ANN elsewhere), and optionally the SNN at every step with more time steps at the first
``--early`` steps. For each run: the FD ratio to the ANN's samples (shipped digit classifier features against
the scikit-learn digits), the mean paired PSNR and the share of samples below 20 dB (samples that went
elsewhere: a different digit or shape). A range whose SNN steps alone cost the whole FD gap is where a fix
has to act.

    OMP_NUM_THREADS=1 python benchmarks/trajectory.py --qcfs DIR [--model DIR] [-T 4] [--num-images 500]
                                                     [--steps 20] [--ranges 0-4,5-9,10-14,15-19] [--early 8x5]
"""

from __future__ import annotations

import click
import torch

from ddim_loop import ddim_samples
from spiking_diffusers.converter import QCFSUNet2DModel, SpikingUNet2DModel
from spiking_diffusers.digits import load_digit_images
from spiking_diffusers.loading import load_model
from spiking_diffusers.metrics import DigitFeatures, FrechetDistance, paired_psnr, reference_statistics

BATCH = 100


def sample(ann, snn, scheduler_config: dict, num_images: int, steps: int, spike_steps) -> torch.Tensor:
    """DDIM samples in [-1, 1]; ``spike_steps(i)`` is the SNN's T at denoising step i, or 0 for the ANN."""

    def predict(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = spike_steps(i)
        return snn(x, t, spike_steps=T).sample if T else ann(x, t).sample

    return ddim_samples(ann.config, scheduler_config, num_images, steps, predict, BATCH)


@click.command()
@click.option("--qcfs", required=True, help="A saved QCFS network (e.g. a low_t.py --save-dir row).")
@click.option("--model", default=None, help="The ANN it came from (default: the shipped digits DDPM).")
@click.option("-T", "--spike-steps", "timesteps", default=4, help="The SNN's T.")
@click.option("--num-images", default=500)
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--ranges", default="0-4,5-9,10-14,15-19", help="Denoising-step ranges the SNN takes alone.")
@click.option("--early", default="", help="Also: the SNN everywhere with T = A at the first N steps (AxN, e.g. 8x5).")
def main(qcfs, model, timesteps, num_images, steps, ranges, early) -> None:
    loaded = load_model(model, "cpu")
    scheduler_config = dict(loaded.scheduler.config)
    snn = SpikingUNet2DModel.from_qcfs(QCFSUNet2DModel.from_pretrained(qcfs), spike_steps=timesteps)
    snn.set_execution("stepwise")  # on CPU faster than batched, same result
    extractor = DigitFeatures()
    real = load_digit_images(size=loaded.unet.config.sample_size)
    frechet = FrechetDistance(extractor, reference_statistics(extractor, real))
    ann = sample(loaded.unet, snn, scheduler_config, num_images, steps, lambda i: 0)
    ann_fd = frechet(ann)
    runs = [("every step", lambda i: timesteps)]
    for part in [p for p in ranges.split(",") if p]:
        low, high = (int(v) for v in part.split("-"))
        runs.append((f"steps {low}-{high} only", lambda i, lo=low, hi=high: timesteps if lo <= i <= hi else 0))
    if early:
        boosted, count = (int(v) for v in early.split("x"))
        runs.append((f"every step, T = {boosted} at the first {count}", lambda i: boosted if i < count else timesteps))
    lines = ["| SNN at | FD ratio | paired PSNR | samples below 20 dB |", "|---|---|---|---|"]
    for name, rule in runs:
        images = sample(loaded.unet, snn, scheduler_config, num_images, steps, rule)
        psnr = paired_psnr(images, ann)
        below = (psnr < 20).float().mean()
        lines.append(f"| {name} | {frechet(images) / ann_fd:.3f} | {psnr.mean():.1f} dB | {below:.1%} |")
        click.echo(lines[-1], err=True)
    click.echo(f"\nANN FD {ann_fd:.3f}, {num_images} samples, DDIM-{steps}, T = {timesteps}\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
