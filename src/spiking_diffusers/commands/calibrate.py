"""``sdm-calibrate``: fit the QCFS thresholds (and weights) of a diffusers UNet so that its spiking
network reproduces the original at few time steps, without the original training data."""

from __future__ import annotations

import click

from ..calibration.calibrate import CalibrationConfig, calibrate
from ..calibration.checkpoint import CalibrationCheckpoints, checkpoint_dir
from ..calibration.distill import TRAIN_OPTIONS, DistillSettings
from ..calibration.report import PLOT_FILE, REPORT_FILE, write_calibration_report
from ..cli import (
    BoundedInt,
    CommandError,
    FiniteFloat,
    atomic_directory,
    burst_option,
    calibration_budget_option,
    check_output,
    check_scheduler_steps,
    device_option,
    get_device,
    model_option,
    output_filter_option,
    output_options,
    output_precision_option,
    residual_spikes_option,
    resolve_threshold_groups,
    sdm_command,
    threshold_groups_option,
)
from ..converter import QCFSUNet2DModel
from ..converter.encoders import SignedQCFS
from ..converter.neurons import NEURON_TYPES, TernaryIFEncoder
from ..distributed import is_main_process
from ..loading import load_model
from ..pipelines import SpikingDiffusionPipeline, make_scheduler

DEFAULTS = CalibrationConfig()
"""The recipe's defaults, shown by --help; the same object sdm-convert calibrates with."""

EXAMPLES = """
\b
Examples:
  sdm-calibrate --output digits-calibrated                      # the shipped model, default recipe
  sdm-calibrate --model google/ddpm-cifar10-32 --timesteps 8 --output cifar-t8
  sdm-calibrate --threshold-init percentile --distill-steps 0 --snn-steps 0 --output init-only
  sdm-convert --model digits-calibrated --output digits-snn     # then convert the result
"""


@sdm_command("sdm-calibrate", epilog=EXAMPLES)
@model_option()
@output_options("Directory for the calibrated model and report.")
@click.option(
    "--spike-steps",
    "--timesteps",
    "-T",
    "timesteps",
    default=DEFAULTS.timesteps,
    type=BoundedInt("timesteps"),
    help="SNN time steps T to calibrate for.",
)
@click.option("--levels", "-L", default=None, type=BoundedInt("levels"), help="QCFS levels L [default: B x T].")
@click.option("--per-channel/--per-layer", default=DEFAULTS.per_channel, help="One threshold per channel, or per site.")
@click.option(
    "--neuron", type=click.Choice(NEURON_TYPES), default=DEFAULTS.neuron, help="Neuron of the fine-tuned SNN."
)
@burst_option()
@output_precision_option()
@output_filter_option()
@residual_spikes_option()
@threshold_groups_option(DEFAULTS.threshold_groups)
@click.option(
    "--offsets/--no-offsets",
    default=DEFAULTS.offsets,
    help="Learn an input shift and an output offset per activation unit, qcfs(z - shift) + offset, so that "
    "units reach below 0 like SiLU (free in the SNN: a bias current and a bias map of the next layer) "
    "[default: on for a UNet2DModel with one threshold group, else off].",
)
@click.option("--threshold-init", type=click.Choice(["mse", "percentile"]), default=DEFAULTS.threshold_init)
@click.option(
    "--percentile",
    default=DEFAULTS.percentile,
    type=FiniteFloat(0, 100, min_open=True),
    help="For percentile init.",
)
@click.option(
    "--num-samples",
    default=DEFAULTS.num_samples,
    type=BoundedInt("num_samples"),
    help="Calibration images drawn from the model.",
)
@click.option(
    "--sampler-steps", default=DEFAULTS.sampler_steps, type=click.IntRange(min=1), help="DDIM steps for those images."
)
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), help="Use these images instead.")
@click.option(
    "--set-size",
    default=DEFAULTS.set_size,
    type=BoundedInt("set_size"),
    help="Noised inputs (x_t, t) in the fixed calibration set, labelled once by the original model.",
)
@click.option(
    "--distill-steps",
    default=DEFAULTS.distill.steps,
    type=click.IntRange(min=0),
    help="QCFS distillation steps (0: skip).",
)
@click.option("--batch-size", default=DEFAULTS.distill.batch_size, type=click.IntRange(min=1))
@click.option("--lr", default=DEFAULTS.distill.lr, type=FiniteFloat(min=0, min_open=True), help="Weight learning rate.")
@click.option("--threshold-lr", default=None, type=FiniteFloat(min=0, min_open=True), help="[default: --lr]")
@click.option(
    "--train",
    type=click.Choice(["weights", "thresholds"]),
    default=DEFAULTS.distill.train,
    help="What distillation fits.",
)
@click.option(
    "--block-loss-weight",
    default=DEFAULTS.distill.block_loss_weight,
    type=FiniteFloat(min=0),
    help="Weight of block-output matching.",
)
@click.option("--grad-clip", default=DEFAULTS.distill.grad_clip, type=FiniteFloat(min=0, min_open=True))
@click.option(
    "--snn-steps", default=DEFAULTS.snn.steps, type=click.IntRange(min=0), help="SNN-aware fine-tuning steps (0: skip)."
)
@click.option("--snn-batch-size", default=DEFAULTS.snn.batch_size, type=click.IntRange(min=1))
@click.option("--snn-lr", default=DEFAULTS.snn.lr, type=FiniteFloat(min=0, min_open=True))
@click.option("--tsm/--no-tsm", default=DEFAULTS.tsm, help="Learn temporal factors p_t per neuron (SDM's TSM).")
@click.option("--tsm-lr", default=DEFAULTS.snn.tsm_lr, type=FiniteFloat(min=0, min_open=True))
@click.option(
    "--snn-train",
    type=click.Choice(TRAIN_OPTIONS),
    default=DEFAULTS.snn.train,
    help="What SNN fine-tuning fits (tsm: the temporal factors alone).",
)
@click.option("--seed", default=DEFAULTS.seed, type=BoundedInt("seed"))
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache of calibration samples [~/.cache/...].")
@click.option(
    "--checkpoint-every",
    default=100,
    type=click.IntRange(min=0),
    help="Save a checkpoint every N training steps (and after each phase; 0: only then), in "
    ".<output>.checkpoint/ beside --output; removed when the output is complete.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (same settings).")
@calibration_budget_option()
@device_option()
def main(model, output, overwrite, device, checkpoint_every, resume, **options) -> None:
    """Calibrate a diffusers UNet2DModel (or a label-conditional UNet2DConditionModel) for conversion into a
    spiking network."""
    check_output(
        output, overwrite, {"--model": model, "--image-dir": options["image_dir"], "--cache-dir": options["cache_dir"]}
    )
    config = build_config(**options)
    try:
        config.validate()
    except ValueError as err:
        raise CommandError(str(err), 2) from err
    loaded = load_model(model, get_device(device))
    if config.image_dir is None:  # the calibration images are sampled with DDIM
        check_scheduler_steps(make_scheduler("ddim", loaded.scheduler.config), config.sampler_steps, "--sampler-steps")
    if config.tsm and config.snn.steps == 0:
        raise CommandError("--tsm needs SNN fine-tuning (--snn-steps > 0): that is where the factors are learned.", 2)
    if config.snn.train == "tsm" and not config.tsm:
        raise CommandError("--snn-train tsm needs --tsm.", 2)
    if loaded.kind != "ann":
        raise CommandError(f"{loaded.source} is already a {loaded.kind.upper()} model; calibrate the original.", 2)
    if loaded.text_conditioned:
        raise CommandError(
            f"{loaded.source}: calibrating a text-conditioned UNet needs prompts, which the commands do not take yet; "
            "convert it with sdm-convert --no-calibrate, or see docs/conditional.md.",
            2,
        )
    resolve_threshold_groups(config.threshold_groups, loaded)  # K must fit the model's schedule
    checkpoints = CalibrationCheckpoints(checkpoint_dir(output), checkpoint_every, resume)
    if resume and not checkpoints.exists():
        click.echo(f"No checkpoint in {checkpoints.directory}; starting from the beginning.", err=True)
    elif not resume and checkpoints.exists():
        click.echo(f"Discarding the checkpoint in {checkpoints.directory} (--resume would continue it).", err=True)
    try:
        with atomic_directory(output, overwrite=overwrite) as staging:
            result = calibrate(
                loaded.unet,
                dict(loaded.scheduler.config),
                config,
                is_main_process(),
                checkpoints,
                label_tokens=loaded.label_tokens,
            )
            pipe = SpikingDiffusionPipeline(
                unet=result.qnet, scheduler=loaded.scheduler, label_tokens=loaded.label_tokens
            )
            pipe.save_pretrained(staging)
            write_calibration_report(result.report, staging)
    except KeyboardInterrupt as err:
        if not checkpoints.exists():
            raise CommandError("Interrupted before the first checkpoint; no partial output was written.", 130) from err
        raise CommandError(
            "Interrupted; no partial output was written. Add --resume to the same command to continue from the "
            f"last checkpoint (in {checkpoints.directory}).",
            130,
        ) from err
    if is_main_process():
        checkpoints.clear()
    print_summary(result.report, output, result.qnet)


def build_config(
    timesteps, levels, per_channel, neuron, residual_spikes, threshold_groups, threshold_init, percentile, num_samples,
    sampler_steps,
    image_dir, distill_steps, batch_size, lr, threshold_lr, train, block_loss_weight, grad_clip, snn_steps,
    snn_batch_size, snn_lr, tsm, tsm_lr, snn_train, seed, cache_dir, offsets=None, set_size=DEFAULTS.set_size,
    calibration_budget=None, burst=None, output_precision=None, output_filter=None,
) -> CalibrationConfig:  # fmt: skip
    """The command's options as a :class:`CalibrationConfig` (the same object ``sdm-convert`` uses)."""
    return CalibrationConfig(
        timesteps=timesteps,
        levels=levels,
        per_channel=per_channel,
        neuron=neuron,
        burst=burst,
        output_precision=1 if output_precision is None else output_precision,
        output_filter=DEFAULTS.output_filter if output_filter is None else output_filter,
        residual_spikes=residual_spikes,  # None: the recipe's default (on for a UNet2DModel)
        threshold_groups=threshold_groups,
        offsets=offsets,  # None: the recipe's default (on for a UNet2DModel with one threshold group)
        threshold_init=threshold_init,
        percentile=percentile,
        num_samples=num_samples,
        sampler_steps=sampler_steps,
        image_dir=image_dir,
        set_size=set_size,
        budget_minutes=calibration_budget,
        distill=DistillSettings(
            steps=distill_steps,
            batch_size=batch_size,
            lr=lr,
            threshold_lr=threshold_lr,
            train=train,
            block_loss_weight=block_loss_weight,
            grad_clip=grad_clip,
        ),
        snn=DistillSettings(
            steps=snn_steps,
            batch_size=snn_batch_size,
            lr=snn_lr,
            train=snn_train,
            grad_clip=grad_clip,
            tsm_lr=tsm_lr,
        ),
        tsm=tsm,
        seed=seed,
        cache_dir=cache_dir,
    )


def print_summary(report: dict, output: str, qnet: QCFSUNet2DModel) -> None:
    """The command's closing lines: sites calibrated, quantization error before and after, loss per phase.

    Encoders are told from activation sites by type, not by name: a convolution's is ``<conv>.encoder``,
    an attention's ``<attention>.input_encoder`` and ``.output_encoder``.
    """
    sites = report["sites"]
    before = sum(s["before"]["quantization_mse"] for s in sites.values()) / len(sites)
    after = sum(s["after"]["quantization_mse"] for s in sites.values()) / len(sites)
    encoders = sum(isinstance(unit, (SignedQCFS, TernaryIFEncoder)) for unit in qnet.sites().values())
    units = f"{len(sites) - encoders} activation sites"
    units += f" and {encoders} residual input encoders" if encoders else ""
    click.echo(f"Calibrated {units} in {report['wall_time_s']:.0f} s.")
    click.echo(f"  mean per-site quantization MSE: {before:.4g} -> {after:.4g}")
    for phase, losses in report["loss_curves"].items():
        if losses:
            click.echo(f"  {phase}: output MSE {losses[0]:.4g} -> {sum(losses[-10:]) / len(losses[-10:]):.4g}")
    sweep = report.get("noise_prediction_sweep") or {}
    if "after" in sweep:
        T = report["settings"]["timesteps"]
        click.echo(f"  relative noise-prediction error of the SNN (T={T}), before -> after calibration:")
        pairs = zip(sweep["timesteps"], sweep["before"]["snn"], sweep["after"]["snn"], strict=True)
        click.echo("    " + ", ".join(f"t={t}: {a:.3f} -> {b:.3f}" for t, a, b in pairs))
    if filtered := report.get("output_filter"):
        last, k = filtered["groups"][-1], filtered["kernel_size"]
        click.echo(
            f"  output filter ({k} x {k}, {len(filtered['groups'])} ranges, fitted on the {filtered['fitted_on']}): "
            f"error at t = {last['timesteps'][0]}..{last['timesteps'][1]} {last['relative_error_before']:.3f} -> "
            f"{last['relative_error_after']:.3f}"
        )
    if "budget" in report and "message" in report["budget"]:
        click.echo(f"  {report['budget']['message']}")
    click.echo(f"Wrote {output} (model, {REPORT_FILE}, {PLOT_FILE}); convert it with: sdm-convert --model {output}")
