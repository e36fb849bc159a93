"""Sample quality of the shipped digits DDPM as a QCFS network and a spiking network at T = 1, 2, 4, 8, 16.

L = T throughout; thresholds are the uncalibrated percentile initialisation of ``quantize`` (calibration is
measured separately). Every network samples the same 1000 initial noises with DDIM (eta 0, 20 steps), so
the FD ratios and PSNRs are paired; the FD is also given over 4 disjoint subsets of 250 for its spread.
Prints the markdown report of ``sdm-eval`` and the wall time; with ``--output`` also writes its files.

    OMP_NUM_THREADS=1 python benchmarks/quality.py [--num-images 1000] [--steps 20] [--output DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from spiking_diffusers.evaluation import EvaluationConfig, evaluate, markdown_report, write_report
from spiking_diffusers.loading import load_model


@click.command(context_settings={"show_default": True})
@click.option("--num-images", default=1000, help="Samples per network.")
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--timesteps", default="1,2,4,8,16", help="SNN time steps T (L = T).")
@click.option("--fd-splits", default=4, help="Disjoint subsets for the FD spread.")
@click.option("--batch-size", default=100)
@click.option("--seed", default=0)
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Also write report.json/md, grid.png.")
def main(num_images: int, steps: int, timesteps: str, fd_splits: int, batch_size: int, seed: int, output) -> None:
    loaded = load_model(None, "cpu")
    config = EvaluationConfig(
        timesteps=[int(t) for t in timesteps.split(",")],
        execution="stepwise",  # on CPU faster than batched, same result
        scheduler="ddim",
        steps=steps,
        num_images=num_images,
        batch_size=batch_size,
        seed=seed,
        fd_splits=fd_splits,
    )
    start = time.perf_counter()
    result = evaluate(loaded.unet, None, dict(loaded.scheduler.config), config)
    wall = time.perf_counter() - start
    result.report["settings"].update(model="shipped digits DDPM", wall_seconds=wall, threads=torch.get_num_threads())
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        write_report(result.report, result.samples, output)
    click.echo(markdown_report(result.report))
    click.echo(f"Wall time {wall:.0f} s on {torch.get_num_threads()} thread(s).")


if __name__ == "__main__":
    main()
