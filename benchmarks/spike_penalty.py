"""Fewer spikes by training for them: a spike-count penalty in QCFS distillation (issue 13's lead, measured).

An IF neuron of a unit at level k (of L) emits k spikes over the T steps, and each spike is one accumulate per
synapse, so the accumulates that dominate the default's energy scale with the mean level. This benchmark adds
``rho`` times the mean of |level| / L over every quantizer output of the student (activation sites and
residual-spike encoders) to the distillation loss, calibrates the default recipe with it, and scores the SNN
like ``benchmarks/low_t.py`` (same rows, same noise). The mechanism lives here, in the benchmark, on purpose:
the measurement decided against adding it to the package (docs/energy.md, "Fewer spikes"), and no unused
option stays behind.

    OMP_NUM_THREADS=1 python benchmarks/spike_penalty.py --rho 0.01,0.05,0.2 [--model DIR] [--num-images 1000]
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import click
import torch

from low_t import DEFAULT, Recipe, markdown, run_row
from spiking_diffusers.converter.qcfs import MIN_THRESHOLD, QuantizerUnit, broadcast_channels
from spiking_diffusers.converter.timestep_groups import group_thresholds
from spiking_diffusers.loading import load_model


@contextlib.contextmanager
def spike_penalty(rho: float) -> Iterator[None]:
    """While active, every loss ``torch.nn.functional.mse_loss`` computes with gradients gains ``rho`` times the
    mean |level| / L of the quantizer outputs seen since the last one. Distillation calls it once per step on the
    noise prediction, so that is where the penalty lands; forwards without gradients record nothing. Patched
    from outside because the package has no hook for extra loss terms (it needs none once this is rejected)."""
    levels: list[torch.Tensor] = []
    elements: list[int] = []
    forward, mse_loss = QuantizerUnit.forward, torch.nn.functional.mse_loss

    def counting_forward(unit: QuantizerUnit, z: torch.Tensor) -> torch.Tensor:
        out = forward(unit, z)
        if torch.is_grad_enabled() and unit.mode != "ann":
            lam = group_thresholds(unit.threshold, unit.group_index).clamp_min(MIN_THRESHOLD)
            levels.append((out.abs() / broadcast_channels(lam, out, unit.channels_last)).sum())
            elements.append(out.numel())
        return out

    def penalised_mse(prediction: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        loss = mse_loss(prediction, target, *args, **kwargs)
        if levels:
            loss = loss + rho * torch.stack(levels).sum() / sum(elements)
            levels.clear()
            elements.clear()
        return loss

    QuantizerUnit.forward, torch.nn.functional.mse_loss = counting_forward, penalised_mse
    try:
        yield
    finally:
        QuantizerUnit.forward, torch.nn.functional.mse_loss = forward, mse_loss


@click.command(context_settings={"show_default": True})
@click.option("--model", default=None, help="ANN directory (default: the shipped digits DDPM).")
@click.option("--rho", default="0.01,0.05,0.2", help="Penalty weights, comma-separated (0: the default recipe).")
@click.option("-T", "--spike-steps", "timesteps", default=4, help="SNN time steps T.")
@click.option("--num-images", default=1000, help="Samples per network.")
@click.option("--fd-splits", default=4, help="Disjoint subsets for the FD ratio spread.")
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--seed", default=0)
@click.option("--save-dir", type=click.Path(file_okay=False), default=None, help="Save (and reuse) each QCFS network.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON here.")
def main(model, rho, timesteps, num_images, fd_splits, steps, seed, save_dir, output) -> None:
    loaded = load_model(model, "cpu")
    options = dict(num_images=num_images, fd_splits=fd_splits, steps=steps, seed=seed, progress=False)
    options["save_dir"] = save_dir
    rows = []
    for weight in (float(value) for value in rho.split(",")):
        start = time.perf_counter()
        recipe = Recipe(f"default + spike penalty rho = {weight:g}", DEFAULT)
        with spike_penalty(weight):
            cells, _ = run_row(f"penalty{weight:g}", recipe, loaded, timesteps, "", options)
        rows.append(cells)
        click.echo(
            f"rho {weight:g}: {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} thread(s)", err=True
        )
        if output:
            Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    click.echo(f"\nANN FD {rows[0]['ann_fd']:.2f} ({num_images} samples, DDIM-{steps}, seed {seed})\n")
    click.echo(markdown(rows))


if __name__ == "__main__":
    main()
