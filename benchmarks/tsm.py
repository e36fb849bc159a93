"""Does the temporal-wise spiking mechanism (TSM) help a converted SNN, alone and with threshold guidance?

On the shipped digits DDPM at T = 2, 4, 8 (L = T): the default calibration recipe without and with TSM
(the factors trained in its SNN fine-tuning). Threshold guidance picks its scale on a separate validation
set (other noises, ``--val-images``) from ``--scales``, then every row is measured on the same main set:
Fréchet distance ratio to the ANN and paired PSNR against the ANN's images (DDIM, eta 0).

    OMP_NUM_THREADS=1 python benchmarks/tsm.py [--num-images 1000] [--val-images 500] [--steps 20]
"""

from __future__ import annotations

import dataclasses
import time

import click
import torch
from diffusers import DDIMScheduler

from spiking_diffusers import convert
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate
from spiking_diffusers.digits import load_digit_images
from spiking_diffusers.evaluation import Variant, sample_variant
from spiking_diffusers.loading import load_model
from spiking_diffusers.metrics import DigitFeatures, FrechetDistance, paired_psnr, reference_statistics
from spiking_diffusers.pipelines.threshold_guidance import scaled_thresholds


@click.command(context_settings={"show_default": True})
@click.option("--num-images", default=1000, help="Main set: samples per network.")
@click.option("--val-images", default=500, help="Validation set for the guidance scale.")
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--timesteps", default="2,4,8", help="SNN time steps T (L = T).")
@click.option("--scales", default="0.98,0.99,0.995,1.0,1.005", help="Threshold-guidance scales to choose from.")
def main(num_images: int, val_images: int, steps: int, timesteps: str, scales: str) -> None:
    loaded = load_model(None, "cpu")
    scheduler_config = dict(loaded.scheduler.config)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    features = DigitFeatures()
    frechet = FrechetDistance(features, reference_statistics(features, load_digit_images(16)))
    scale_values = [float(s) for s in scales.split(",")]

    def sample(unet, name, t, seed, count):
        variant = Variant(name, "snn" if t else "ann", unet, timesteps=t)
        return sample_variant(variant, scheduler, count, steps, seed=seed, batch_size=100, progress=False)[0]

    ann_main, ann_val = sample(loaded.unet, "ANN", None, 0, num_images), sample(loaded.unet, "ANN", None, 1, val_images)
    ann_fd = frechet(ann_main)
    click.echo(f"ANN FD {ann_fd:.3f} on {num_images} images; validation ANN FD {frechet(ann_val):.3f}")
    table = []
    for t in [int(v) for v in timesteps.split(",")]:
        row = {"T": t}
        for tsm in (False, True):
            start = time.perf_counter()
            config = dataclasses.replace(CalibrationConfig(), timesteps=t, tsm=tsm)
            qnet = calibrate(loaded.unet, scheduler_config, config, progress=False).qnet
            snn = convert(qnet, timesteps=t, execution="stepwise")
            val_fd = {}
            for scale in scale_values:
                with scaled_thresholds(snn, scale):
                    val_fd[scale] = frechet(sample(snn, f"SNN T={t}", t, 1, val_images))
            best = min(val_fd, key=val_fd.get)
            main_images = {}  # by scale: when validation picks 1.0, the guided cell reuses the plain images
            for scale, label in ((1.0, "plain"), (best, "guided")):
                if scale not in main_images:
                    with scaled_thresholds(snn, scale):
                        main_images[scale] = sample(snn, f"SNN T={t}", t, 0, num_images)
                images = main_images[scale]
                name = f"{'TSM' if tsm else 'no TSM'}, {label}"
                row[name] = (frechet(images) / ann_fd, paired_psnr(images, ann_main).mean().item(), scale)
            click.echo(f"T={t} tsm={tsm}: validation FD by scale {val_fd}; {time.perf_counter() - start:.0f} s")
        table.append(row)
    columns = ["no TSM, plain", "TSM, plain", "no TSM, guided", "TSM, guided"]
    click.echo("\n| T | SNN-aware fine-tuning | + TSM | + threshold guidance | + both |")
    click.echo("|---|---|---|---|---|")
    for row in table:
        cells = []
        for column in columns:
            ratio, psnr, scale = row[column]
            cells.append(f"{ratio:.2f} / {psnr:.1f}" + (f" (s={scale:g})" if "guided" in column else ""))
        click.echo(f"| {row['T']} | " + " | ".join(cells) + " |")
    click.echo("\nCells: FD ratio to the ANN / paired PSNR vs the ANN (dB); s: the scale picked on validation.")
    click.echo(f"{torch.get_num_threads()} thread(s).")


if __name__ == "__main__":
    main()
