"""``sdm-eval``: how much sample quality the QCFS and spiking networks lose against the original ANN."""

from __future__ import annotations

import click

from ..cli import (
    BoundedInt,
    CommandError,
    TScheduleParam,
    atomic_directory,
    calibration_config,
    calibration_options,
    check_guidance,
    check_output,
    check_scheduler_steps,
    check_t_schedule,
    class_labels_option,
    device_option,
    get_device,
    model_option,
    output_options,
    parse_float_list,
    residual_spikes_option,
    resolve_class_labels,
    resolve_threshold_groups,
    sdm_command,
    threshold_groups_option,
)
from ..converter.neurons import NEURON_TYPES
from ..converter.temporal import EXECUTION_MODES
from ..digits import SHIPPED_CONDITIONAL_PATH
from ..distributed import is_main_process
from ..evaluation import (
    GRID_PNG,
    REPORT_JSON,
    REPORT_MD,
    EvaluationConfig,
    VariantError,
    evaluate,
    markdown_report,
    write_report,
)
from ..loading import load_model
from ..metrics import FeatureExtractorError
from ..pipelines import SCHEDULERS, make_scheduler
from ..validation import BOUNDS

EXAMPLES = """
\b
Examples:
  sdm-eval --output eval                                   # shipped model, T = 1,2,4,8,16, L = T
  sdm-eval --timesteps 4,8 --levels 8 --num-images 200 --fd-splits 4 --output eval-l8
  sdm-eval --model digits-calibrated --output eval-cal     # a calibrated QCFS model vs the shipped ANN
  sdm-eval --model digits-calibrated -T 4,8 --t-schedule 4,16x3 --output eval-sched   # + a T schedule (mean 5.8)
  sdm-eval --model digits-conditional -T 4,8 --guidance-scale 1,3 --output eval-cond   # + conditional accuracy
  sdm-eval --model my-ddpm --real-images real/ --inception-weights weights-inception-2015-12-05-6726825d.pth \\
      --output eval-fid
"""


def parse_int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (each in the bounds of T, duplicates dropped, order kept)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from err
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    bound = BOUNDS["timesteps"]
    if max(values) > bound.high:
        raise click.BadParameter(f"expected integers in the range {bound.describe()}, got {value!r} ({bound.why})")
    return list(dict.fromkeys(values))


@sdm_command("sdm-eval", epilog=EXAMPLES)
@model_option("ANN, QCFS or spiking model (hub id or directory); default: the shipped digits DDPM.")
@click.option(
    "--reference-model",
    default=None,
    metavar="ID_OR_DIR",
    help="The original ANN, when --model is a QCFS or spiking model [default: the shipped digits DDPM, or for a "
    "conditional model the shipped conditional digits model].",
)
@output_options("Directory for report.json, report.md, grid.png.")
@click.option(
    "--spike-steps",
    "--timesteps",
    "-T",
    "timesteps",
    default="1,2,4,8,16",
    callback=parse_int_list,
    help="SNN time steps T to compare.",
)
@click.option(
    "--t-schedule",
    "t_schedules",
    multiple=True,
    type=TScheduleParam(),
    metavar="SCHEDULE",
    help="Also compare the SNN with this T per denoising step: 4,16x3 is T = 16 for the last 3 steps and 4 for "
    "the others (L = --levels, else the T most steps take); TxK items adding up to --steps give every step. "
    "Repeatable.",
)
@click.option("--levels", "-L", default=None, type=BoundedInt("levels"), help="QCFS levels L [default: L = T].")
@click.option("--neuron", type=click.Choice(NEURON_TYPES), default=None, help="Neuron for conversions [default: if].")
@click.option(
    "--execution",
    type=click.Choice(["auto", *EXECUTION_MODES]),
    default="auto",
    help="SNN time simulation; same result. auto: stepwise on CPU (faster there), batched elsewhere.",
)
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="ddim", help="Sampler (ddim: deterministic).")
@click.option("--steps", default=20, type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--num-images", "-n", default=1000, type=BoundedInt("num_images", low=2), help="Samples per network.")
@click.option("--batch-size", default=100, type=click.IntRange(min=1), help="Images per UNet call.")
@click.option("--seed", default=0, type=BoundedInt("seed"), help="Seed of the initial noise (shared by every network).")
@click.option("--fd-splits", default=1, type=click.IntRange(min=1), help="Also report FD over K disjoint subsets.")
@click.option("--noise-timesteps", default=10, type=click.IntRange(min=1), help="Diffusion timesteps in the sweep.")
@click.option("--noise-images", default=64, type=click.IntRange(min=1), help="Real images per sweep timestep.")
@click.option(
    "--inception-weights",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="torch-fidelity's Inception-v3 weights (.pth) for true FID instead of digit-classifier features.",
)
@click.option(
    "--real-images",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of real PNG/JPEG images for the FD reference [default: the scikit-learn digits].",
)
@click.option("--grid-rows", default=8, type=click.IntRange(min=1), help="Rows (noises) in grid.png.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Cache of real-data FD statistics [$SDM_CACHE_DIR or ~/.cache/spiking-diffusers].",
)
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@class_labels_option()
@click.option(
    "--guidance-scale",
    "guidance_scales",
    default="1",
    metavar="W[,W...]",
    help="Label-conditional models: classifier-free guidance scales to sample every network at (1: none).",
)
@residual_spikes_option()
@threshold_groups_option()
@calibration_options
@device_option()
def main(
    model, reference_model, output, overwrite, device, calibrate, calibration_samples, calibration_steps, snn_steps,
    calibration_set_size, calibration_budget, **options,
) -> None:  # fmt: skip
    """Sample from the ANN, its QCFS network and its spiking network at each T from the same noise, and
    report Fréchet distance, paired PSNR and noise-prediction error."""
    check_output(
        output,
        overwrite,
        {
            "--model": model,
            "--reference-model": reference_model,
            "--real-images": options["real_images"],
            "--inception-weights": options["inception_weights"],
            "--cache-dir": options["cache_dir"],
        },
    )
    for schedule in options["t_schedules"]:
        check_t_schedule(schedule, options["steps"], "--t-schedule")
    options["t_schedules"] = [str(schedule) for schedule in options["t_schedules"]]
    torch_device = get_device(device)
    if options["execution"] == "auto":
        options["execution"] = "stepwise" if torch_device.type == "cpu" else "batched"
    calibration = calibration_config(
        calibrate,
        calibration_samples,
        calibration_steps,
        snn_steps,
        options["neuron"],
        options["residual_spikes"],
        options["threshold_groups"],
        calibration_budget,
        set_size=calibration_set_size,
    )
    options["progress"] = options["progress"] and is_main_process()
    guidance_scales = list(dict.fromkeys(parse_float_list(options.pop("guidance_scales"), "--guidance-scale")))
    class_labels = options.pop("class_labels")
    loaded = load_model(model, torch_device)
    check_guidance(guidance_scales, loaded)
    config = EvaluationConfig(
        **options,
        calibration=calibration,
        # every class in turn by default; a text-conditioned model or labels for an unconditional one are refused
        class_labels=resolve_class_labels(class_labels, loaded),
        guidance_scales=guidance_scales,
    )
    resolve_threshold_groups(options["threshold_groups"], loaded)  # fits an ANN's schedule, or is the model's own
    check_scheduler_steps(make_scheduler(options["scheduler"], loaded.scheduler.config), options["steps"], "--steps")
    reference = None
    if loaded.kind != "ann":
        if reference_model is None and loaded.cross_attention:
            reference_model = SHIPPED_CONDITIONAL_PATH
        reference = load_model(reference_model, torch_device)
        if reference.kind != "ann":
            raise CommandError(f"--reference-model {reference.source} is a {reference.kind.upper()} model.", 2)
    with atomic_directory(output, overwrite=overwrite) as staging:
        try:
            result = evaluate(
                loaded.unet,
                reference.unet if reference else None,
                dict(loaded.scheduler.config),
                config,
                loaded.label_tokens,
            )
        except (VariantError, FeatureExtractorError) as err:
            raise CommandError(str(err), exit_code=2) from err
        result.report["settings"].update(model=loaded.source, reference_model=reference.source if reference else None)
        write_report(result.report, result.samples, staging, config.grid_rows)
    click.echo(markdown_report(result.report))
    click.echo(f"Wrote {output}/{REPORT_JSON}, {REPORT_MD} and {GRID_PNG}.")
