"""What each stage of the calibration recipe buys, on the shipped digits DDPM, at T = 1, 2, 4, 8, 16 (L = T).

Rows: percentile thresholds only; MSE thresholds + QCFS distillation; + SNN-aware fine-tuning (the default
recipe); the default recipe with signed IF neurons. Each row calibrates one QCFS network per T with
:func:`spiking_diffusers.calibration.calibrate`, then ``sdm-eval``'s evaluation samples the ANN, the QCFS
network and the SNN from the same noises (DDIM, eta 0) and reports the Fréchet distance ratio to the ANN and
the paired PSNR against the ANN's images. Prints one table per row and a summary.

    OMP_NUM_THREADS=1 python benchmarks/calibration.py [--num-images 1000] [--steps 20] [--output DIR]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import torch

from spiking_diffusers.calibration.calibrate import CalibrationConfig
from spiking_diffusers.evaluation import EvaluationConfig, evaluate, markdown_report
from spiking_diffusers.loading import load_model

DEFAULT = CalibrationConfig()
RECIPES = {
    "percentile init only": dataclasses.replace(
        DEFAULT,
        threshold_init="percentile",
        distill=dataclasses.replace(DEFAULT.distill, steps=0),
        snn=dataclasses.replace(DEFAULT.snn, steps=0),
    ),
    "mse init + distillation": dataclasses.replace(DEFAULT, snn=dataclasses.replace(DEFAULT.snn, steps=0)),
    "+ SNN-aware fine-tuning (default)": DEFAULT,
    "default with signed IF": dataclasses.replace(DEFAULT, neuron="signed_if"),
}


@click.command(context_settings={"show_default": True})
@click.option("--num-images", default=1000, help="Samples per network.")
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--timesteps", default="1,2,4,8,16", help="SNN time steps T (L = T).")
@click.option("--recipes", default=",".join(RECIPES), help="Which rows to run (comma-separated names).")
@click.option("--seed", default=0)
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Also write the reports as JSON.")
def main(num_images: int, steps: int, timesteps: str, recipes: str, seed: int, output) -> None:
    loaded = load_model(None, "cpu")
    names = [r.strip() for r in recipes.split(",")]
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        raise click.BadParameter(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}.", param_hint="--recipes")
    summary = {}
    for name in names:
        recipe = RECIPES[name]
        config = EvaluationConfig(
            timesteps=[int(t) for t in timesteps.split(",")],
            neuron=recipe.neuron,
            execution="stepwise",  # on CPU faster than batched, same result
            steps=steps,
            num_images=num_images,
            seed=seed,
            calibration=recipe,
            progress=False,
        )
        start = time.perf_counter()
        report = evaluate(loaded.unet, None, dict(loaded.scheduler.config), config).report
        wall = time.perf_counter() - start
        click.echo(f"\n### {name} ({wall:.0f} s on {torch.get_num_threads()} thread(s))\n")
        click.echo(markdown_report(report))
        summary[name] = {row["name"]: row for row in report["variants"]}
        if output:
            Path(output).mkdir(parents=True, exist_ok=True)
            (Path(output) / f"{name.replace(' ', '_').replace('+', 'plus')}.json").write_text(json.dumps(report))
    click.echo("\n### FD ratio to the ANN (SNN at T, L = T) / paired PSNR vs the ANN (dB)\n")
    click.echo("| recipe | " + " | ".join(f"T={t}" for t in timesteps.split(",")) + " |")
    click.echo("|---|" + "---|" * len(timesteps.split(",")))
    for name, rows in summary.items():
        cells = []
        for t in timesteps.split(","):
            row = rows[f"SNN T={t}"]
            cells.append(f"{row['fd_ratio']:.2f} / {row['psnr_mean']:.1f}")
        click.echo(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
