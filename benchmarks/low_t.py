"""What each few-time-step technique buys, alone and combined: the ablation table of docs/benchmarks.md.

Every row calibrates one QCFS network from the ANN with the ``sdm-calibrate`` recipe it names (timed),
converts it, and samples the ANN, the QCFS network and the SNN from the same noises (DDIM, eta 0) with
``sdm-eval``'s evaluation. Printed per row: FD ratio to the ANN (whole set) and the mean +- std of the
paired per-split ratios, paired PSNR against the ANN, the relative noise-prediction error at the smallest
swept diffusion timestep and its mean over the sweep, the mean T per denoising step, calibration wall time,
and the SNN / ANN energy ratio and spike-driven share of a counted DDIM sampling run (issue 6 accounting),
counted with every spike sent and with delta spikes (changes from the previous UNet evaluation: the same
samples, see ``benchmarks/delta_spikes.py``).

Rows (``--rows``, comma-separated keys):

- ``before``: the previous default: plain IF neurons (one spike per step), 2000 distillation steps;
- ``plain``: plain IF neurons with today's recipe (stored teacher labels, uniform timesteps, 1000 steps);
- ``default``: today's default, burst neurons (B = 4, L = 4T) through the SNN-aware stage, with residual spikes
  (burst encoders), offsets (an input shift and output offset per channel) and the 5 x 5 output filter;
- ``nofilter``: the default network without its output filter (the same calibration: a paired comparison);
- ``nosnn``: the default recipe without its SNN-aware fine-tuning (the output filter still fitted on the SNN);
- ``output4``: the default with the output activation at 4 x the levels and spikes per step (``output_precision``);
- ``burst8``: the default with B = 8 spikes per step (L = 8T: the levels of the default at 2T, with the real-valued
  ops run T times);
- ``burst4`` / ``burst2`` / ``burst3``: burst neurons with B = 4, 2 (a previous default) or 3, no residual spikes;
  these and the rows below calibrate without the output filter, as when they were measured;
- ``offsets`` / ``groups4`` / ``signed`` / ``residual``: plain + learned input shift and output offset per
  channel (SiLU's negative lobe) / K = 4 timestep-aware thresholds / signed IF / residual spikes (signed
  encoders in front of the real-valued layers; issue 13);
- ``burst2_after`` / ``residual_burst2_after``: plain(+ residual spikes) calibrated at T = L = 2T, converted
  to burst neurons (B = 2) afterwards (the first burst measurement);
- ``nooffsets``: the default without offsets (the default until they became one; measured as ``default``);
- ``burst2_residual``: B = 2 + residual spikes;
- ``schedule``: the plain network sampled with the T schedule ``--schedule`` (more T at the last steps);
- ``default_schedule``: the default network sampled with the T schedule ``--schedule``;
- ``heldE`` (e.g. ``held3``): the default network with its real-valued ops computed at E of the T steps
  (``nonlinear_steps``);
- ``distillN`` (e.g. ``distill3000``): the default recipe with N QCFS distillation steps instead of 1000;
- ``snnN`` (e.g. ``snn300``): the default recipe with N SNN-aware fine-tuning steps instead of 100;
- any key with ``@N`` (e.g. ``default@8``): that row at T = N instead of ``-T``.

    OMP_NUM_THREADS=2 python benchmarks/low_t.py [--model DIR] [--rows default,offsets] [-T 4]
                                                 [--num-images 1000] [--fd-splits 4] [--grid PATH]
                                                 [--calibration-seed 0]
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from spiking_diffusers.calibration.calibrate import CalibrationConfig
from spiking_diffusers.calibration.policy import calibrate_or_quantize
from spiking_diffusers.converter import QCFSUNet2DModel, SpikingUNet2DModel
from spiking_diffusers.energy.measure import measure_energy
from spiking_diffusers.evaluation import EvaluationConfig, evaluate
from spiking_diffusers.evaluation.report import save_grid
from spiking_diffusers.loading import load_model
from spiking_diffusers.pipelines import make_scheduler

DEFAULT = CalibrationConfig()


@dataclass
class Recipe:
    """How one row calibrates (``calibration``, at L = B x T of its burst setting) and samples (``schedule``).
    ``burst_after`` converts a plain-IF network calibrated at L = B x T to burst neurons afterwards (the
    SNN-aware stage then ran at T = L with one spike per step: the first burst measurement)."""

    label: str
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    burst_after: int = 1
    schedule: bool = False
    timesteps: int | None = None
    calibrated_as: str | None = None  # the row whose saved QCFS network this one reuses
    nonlinear_steps: int | None = None  # E: the real-valued ops computed at E of the T steps
    output_filter: bool = True  # False: sample without the calibrated network's output filter


NO_SNN_STAGE = dataclasses.replace(DEFAULT.snn, steps=0)
UNFILTERED = dataclasses.replace(DEFAULT, output_filter=0, offsets=False)  # the recipe before the output filter
PLAIN = dataclasses.replace(UNFILTERED, burst=1, residual_spikes=False)
BURST = dataclasses.replace(UNFILTERED, residual_spikes=False)  # burst neurons, real values on the residual stream
RECIPES = {
    "before": Recipe(
        "before: plain IF, 2000 steps",
        dataclasses.replace(PLAIN, distill=dataclasses.replace(PLAIN.distill, steps=2000)),
    ),
    "plain": Recipe("plain IF (B = 1), 1000 steps", PLAIN),
    "default": Recipe("default: burst B = 4 (L = 4T) + residual spikes + offsets + output filter", DEFAULT),
    "nofilter": Recipe("default without its output filter", DEFAULT, calibrated_as="default", output_filter=False),
    "nosnn": Recipe("default without SNN-aware fine-tuning", dataclasses.replace(DEFAULT, snn=NO_SNN_STAGE)),
    "output4": Recipe("default + output precision 4", dataclasses.replace(DEFAULT, output_precision=4)),
    "burst8": Recipe("default with burst B = 8 (L = 8T)", dataclasses.replace(DEFAULT, burst=8)),
    "burst4": Recipe("burst B = 4 (L = 4T)", BURST),
    "burst2": Recipe("burst B = 2 (L = 2T)", dataclasses.replace(BURST, burst=2)),
    "burst3": Recipe("burst B = 3 (L = 3T)", dataclasses.replace(BURST, burst=3)),
    "offsets": Recipe("plain + offsets", dataclasses.replace(PLAIN, offsets=True)),
    "groups4": Recipe("plain + K = 4 threshold groups", dataclasses.replace(PLAIN, threshold_groups=4)),
    "burst2_after": Recipe("plain, L = 2T, burst B = 2 after", dataclasses.replace(PLAIN, burst=2), burst_after=2),
    "nooffsets": Recipe("default without offsets", dataclasses.replace(DEFAULT, offsets=False)),
    "signed": Recipe("signed IF", dataclasses.replace(PLAIN, neuron="signed_if")),
    "schedule": Recipe("plain, T schedule", PLAIN, schedule=True, calibrated_as="plain"),
    "default_schedule": Recipe("default, T schedule", DEFAULT, schedule=True, calibrated_as="default"),
    "residual": Recipe("plain + residual spikes", dataclasses.replace(PLAIN, residual_spikes=True)),
    "residual_burst2_after": Recipe(
        "plain + residual spikes, L = 2T, burst B = 2 after",
        dataclasses.replace(PLAIN, burst=2, residual_spikes=True),
        burst_after=2,
    ),
    "burst2_residual": Recipe(
        "burst B = 2 + residual spikes", dataclasses.replace(UNFILTERED, burst=2, residual_spikes=True)
    ),
}


def recipe_for(key: str) -> Recipe:
    """The recipe of a ``--rows`` key: a name of :data:`RECIPES`, ``heldE``, ``distillN`` or ``snnN``, optionally
    ``@T``."""
    name, _, at = key.partition("@")
    held = name.startswith("held") and name[4:].isdigit() and int(name[4:]) >= 2
    longer = name.startswith("distill") and name[7:].isdigit() and int(name[7:]) >= 1
    snn_steps = name.startswith("snn") and name[3:].isdigit() and int(name[3:]) >= 1
    if (name not in RECIPES and not held and not longer and not snn_steps) or (at and not at.isdigit()):
        raise click.BadParameter(
            f"unknown row {key!r}; choose from {list(RECIPES)}, heldE (E >= 2), distillN (N >= 1 distillation "
            "steps) or snnN (N >= 1 SNN-aware steps), each optionally @T.",
            "--rows",
        )
    if held:
        steps = int(name[4:])
        label = f"default, real-valued ops at {steps} of the T steps"
        recipe = Recipe(label, DEFAULT, calibrated_as="default", nonlinear_steps=steps)
    elif longer:
        steps = int(name[7:])
        calibration = dataclasses.replace(DEFAULT, distill=dataclasses.replace(DEFAULT.distill, steps=steps))
        recipe = Recipe(f"default, {steps} distillation steps", calibration)
    elif snn_steps:
        steps = int(name[3:])
        calibration = dataclasses.replace(DEFAULT, snn=dataclasses.replace(DEFAULT.snn, steps=steps))
        recipe = Recipe(f"default, {steps} SNN-aware steps", calibration)
    else:
        recipe = RECIPES[name]
    return dataclasses.replace(recipe, timesteps=int(at), label=f"{recipe.label}, T = {at}") if at else recipe


def run_row(key: str, recipe: Recipe, loaded, T: int, schedule: str, options: dict) -> tuple[dict, dict]:
    """Calibrate, convert, evaluate and count one row; its table cells and its ANN and SNN samples."""
    T = recipe.timesteps or T
    calibration = dataclasses.replace(recipe.calibration, timesteps=T)
    levels = calibration.resolved_levels
    if recipe.burst_after > 1:  # calibrated as a plain-IF network at T = L
        calibration = dataclasses.replace(calibration, burst=1, timesteps=levels)
    scheduler_config = dict(loaded.scheduler.config)
    at = f"-T{recipe.timesteps}" if recipe.timesteps else ""
    saved = (
        Path(options["save_dir"]) / f"qcfs-{recipe.calibrated_as or key.partition('@')[0]}{at}"
        if options["save_dir"]
        else None
    )
    if saved is not None and (saved / "calibration_seconds.json").is_file():  # calibrated by an earlier row or run
        qnet = QCFSUNet2DModel.from_pretrained(saved).eval()
        calibration_seconds = json.loads((saved / "calibration_seconds.json").read_text())["seconds"]
    else:
        start = time.perf_counter()
        qnet = calibrate_or_quantize(
            loaded.unet,
            levels=levels,
            per_channel=calibration.per_channel,
            timesteps=calibration.timesteps,
            scheduler_config=scheduler_config,
            calibration=calibration,
            progress=options["progress"],
            seed=options["calibration_seed"],  # calibrate_or_quantize sets the calibration's seed
        ).qnet
        calibration_seconds = time.perf_counter() - start
        if saved is not None:
            qnet.save_pretrained(saved)
            (saved / "calibration_seconds.json").write_text(json.dumps({"seconds": calibration_seconds}))
    if not recipe.output_filter:
        qnet.set_output_filter(0)
    burst = recipe.burst_after if recipe.burst_after > 1 else None  # None: as calibrated
    snn = SpikingUNet2DModel.from_qcfs(
        qnet, spike_steps=T, neuron=calibration.neuron, burst=burst, nonlinear_steps=recipe.nonlinear_steps
    )
    config = EvaluationConfig(
        timesteps=[] if recipe.schedule else [T],
        t_schedules=[schedule] if recipe.schedule else [],
        execution="stepwise",  # on CPU faster than batched, same result
        steps=options["steps"],
        num_images=options["num_images"],
        fd_splits=options["fd_splits"],
        seed=options["seed"],
        progress=options["progress"],
    )
    result = evaluate(snn, loaded.unet, scheduler_config, config)
    row = result.report["variants"][-1]
    energy, delta = (
        measure_energy(
            snn,
            loaded.unet,
            make_scheduler("ddim", scheduler_config),
            options["steps"],
            num_images=2,
            snn_timesteps=schedule if recipe.schedule else None,
            delta_spikes=counted_with_delta,
        ).totals()
        for counted_with_delta in (False, True)
    )
    cells = {
        "row": key,
        "recipe": recipe.label,
        "T": row["timesteps"],
        "L": levels,
        "mean_T": row["mean_timesteps"],
        "fd_ratio": row["fd_ratio"],
        "fd_ratio_split_mean": row["fd_ratio_split_mean"],
        "fd_ratio_split_std": row["fd_ratio_split_std"],
        "psnr": row["psnr_mean"],
        "noise_error_small_t": row["noise_error"][0],
        "noise_error_mean": row["noise_error_mean"],
        "noise_error": row["noise_error"],
        "noise_timesteps": result.report["noise_timesteps"],
        "calibration_seconds": calibration_seconds,
        "energy_ratio": energy["energy_ratio_snn_over_ann"],
        "spike_driven_fraction": energy["spike_driven_fraction"],
        "energy_ratio_delta": delta["energy_ratio_snn_over_ann"],
        "spike_driven_fraction_delta": delta["spike_driven_fraction"],
        "ann_fd": result.report["variants"][0]["fd"],
    }
    return cells, {"ANN": result.samples["ANN"], recipe.label: result.samples[row["name"]]}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| recipe | T (mean) | L | FD ratio | split ratio mean +- std | PSNR dB | noise err t=1 / mean "
        "| calibration s | SNN/ANN energy | spike-driven | with delta spikes: energy, spike-driven |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = f"{r['fd_ratio_split_mean']:.2f} +- {r['fd_ratio_split_std']:.2f}" if r["fd_ratio_split_mean"] else "-"
        lines.append(
            f"| {r['recipe']} | {r['T']} ({r['mean_T']:.1f}) | {r['L']} | {r['fd_ratio']:.2f} | {split} "
            f"| {r['psnr']:.1f} | {r['noise_error_small_t']:.3f} / {r['noise_error_mean']:.3f} "
            f"| {r['calibration_seconds']:.0f} | {r['energy_ratio']:.2f} | {r['spike_driven_fraction']:.1%} "
            f"| {r['energy_ratio_delta']:.2f}, {r['spike_driven_fraction_delta']:.1%} |"
        )
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.option("--model", default=None, help="ANN directory (default: the shipped digits DDPM).")
@click.option("--rows", default="before,burst2,default,offsets,groups4,signed,schedule", help="Which rows, in order.")
@click.option("-T", "--spike-steps", "timesteps", default=4, help="SNN time steps T of every row.")
@click.option("--schedule", default="4,12x2", help="The T schedule of the schedule row.")
@click.option("--num-images", default=1000, help="Samples per network.")
@click.option("--fd-splits", default=4, help="Disjoint subsets for the FD ratio spread.")
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--seed", default=0, help="Seed of the sampling noise.")
@click.option(
    "--calibration-seed",
    default=0,
    help="Seed of every row's calibration: rank recipes over several (one calibration's FD ratio moves by ~0.1).",
)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON here.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Save ANN | each row's SNN samples here.")
@click.option(
    "--save-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Save each row's QCFS network here (and reuse it).",
)
@click.option("--progress/--no-progress", default=False)
def main(
    model,
    rows,
    timesteps,
    schedule,
    num_images,
    fd_splits,
    steps,
    seed,
    calibration_seed,
    output,
    grid,
    save_dir,
    progress,
) -> None:
    loaded = load_model(model, "cpu")
    keys = [key.strip() for key in rows.split(",") if key.strip()]
    recipes = [(key, recipe_for(key)) for key in keys]
    options = dict(num_images=num_images, fd_splits=fd_splits, steps=steps, seed=seed, progress=progress)
    options["save_dir"] = save_dir
    options["calibration_seed"] = calibration_seed
    results, samples = [], {}
    for key, recipe in recipes:
        start = time.perf_counter()
        cells, images = run_row(key, recipe, loaded, timesteps, schedule, options)
        results.append(cells)
        samples.update({name if name == "ANN" else f"{key} T={cells['T']}": v for name, v in images.items()})
        click.echo(f"{key}: {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} thread(s)", err=True)
        click.echo(markdown(results[-1:]).splitlines()[-1], err=True)
        if output:
            Path(output).write_text(json.dumps(results, indent=2) + "\n")
    click.echo(f"\nANN FD {results[0]['ann_fd']:.2f} ({num_images} samples, DDIM-{steps}, seed {seed})\n")
    click.echo(markdown(results))
    if grid:
        save_grid(samples, grid, rows=8)


if __name__ == "__main__":
    main()
