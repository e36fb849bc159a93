"""``sdm-convert``: a diffusers UNet (original or calibrated QCFS) in, a spiking diffusion pipeline out.

The output directory is a saved ``SpikingDiffusionPipeline`` (``model_index.json``, ``unet/``,
``scheduler/`` with the source model's scheduler) plus ``conversion.json`` with the summary printed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
import torch
from diffusers import UNet2DModel

from ..calibration.report import PLOT_FILE, REPORT_FILE, write_calibration_report
from ..cli import (
    BoundedInt,
    CommandError,
    atomic_directory,
    burst_option,
    calibration_config,
    calibration_options,
    check_output,
    conversion_source,
    delta_spikes_option,
    device_option,
    get_device,
    model_option,
    offsets_option,
    option_given,
    output_filter_option,
    output_options,
    output_precision_option,
    residual_spikes_option,
    resolve_threshold_groups,
    sdm_command,
    threshold_groups_option,
)
from ..converter import QCFSUNet2DModel, convert
from ..converter.building import unet_config_dict
from ..converter.models import THRESHOLD_FORMS
from ..converter.neurons import NEURON_TYPES
from ..converter.summary import conversion_summary
from ..converter.temporal import NONLINEAR_MODES
from ..loading import LoadedModel, load_model
from ..metrics import fidelity_check
from ..pipelines import SpikingDiffusionPipeline

EXAMPLES = """
\b
Examples:
  sdm-convert --output digits-snn                                # the shipped digits model, T = L = 4
  sdm-convert --model google/ddpm-cifar10-32 --timesteps 8 --output cifar-snn-t8
  sdm-convert --model digits-calibrated --timesteps 4 --output digits-snn   # a model from sdm-calibrate
  sdm-convert --model my-ddpm --neuron signed_if --threshold-form unit --per-channel --output my-snn
  sdm-sample --model digits-snn --output samples                 # then sample from it
"""


@sdm_command("sdm-convert", epilog=EXAMPLES)
@model_option("Hub id or local directory of a UNet2DModel or UNet2DConditionModel (either layout, or a whole "
              "Stable Diffusion pipeline) or of a calibrated QCFS model; "
              "default: the digits DDPM shipped in the package.")  # fmt: skip
@output_options("Directory for the spiking pipeline.")
@click.option(
    "--spike-steps",
    "--timesteps",
    "-T",
    "timesteps",
    default=4,
    type=BoundedInt("timesteps"),
    help="SNN time steps T per UNet call.",
)
@click.option(
    "--levels", "-L", default=None, type=BoundedInt("levels"), help="QCFS levels L of an ANN [default: B x T]."
)
@click.option("--neuron", type=click.Choice(NEURON_TYPES), default="if", help="Plain or signed (Fast-SNN) IF.")
@burst_option(own_model=True)
@output_precision_option(own_model=True)
@output_filter_option(own_model=True)
@click.option(
    "--nonlinear-mode",
    type=click.Choice(NONLINEAR_MODES),
    default="compensated",
    help="GroupNorm and attention: expectation-compensated or applied per time step.",
)
@click.option(
    "--nonlinear-steps",
    "-E",
    default=None,
    type=BoundedInt("timesteps", low=2),
    help="Compute the compensated real-valued ops (GroupNorm, attention, ...) at E of the T time steps only, "
    "holding their value in between: exact in the mean, E/T of their cost [default: every step].",
)
@click.option(
    "--threshold-form",
    type=click.Choice(THRESHOLD_FORMS),
    default="lambda",
    help="Thresholds = lambda, or all 1 with lambda folded into the weights.",
)
@click.option("--per-channel/--per-layer", default=True, help="One threshold per channel, or one per site (ANN only).")
@residual_spikes_option()
@threshold_groups_option()
@offsets_option()
@delta_spikes_option()
@calibration_options
@click.option(
    "--reference",
    default=None,
    metavar="ID_OR_DIR",
    help="The original ANN, for the fidelity check of a calibrated QCFS model (whose weights calibration may have "
    "changed) [default: the QCFS weights with the original activations].",
)
@click.option("--seed", default=0, type=BoundedInt("seed"), help="Seed of the threshold probes and the fidelity check.")
@device_option()
def main(
    model,
    output,
    overwrite,
    timesteps,
    levels,
    neuron,
    burst,
    output_precision,
    output_filter,
    nonlinear_mode,
    nonlinear_steps,
    threshold_form,
    per_channel,
    residual_spikes,
    threshold_groups,
    offsets,
    delta_spikes,
    calibrate,
    calibration_samples,
    calibration_steps,
    snn_steps,
    calibration_set_size,
    calibration_budget,
    reference,
    seed,
    device,
) -> None:
    """Convert a diffusers UNet2DModel or UNet2DConditionModel into an integrate-and-fire spiking network."""
    check_output(output, overwrite, {"--model": model, "--reference": reference})
    device = get_device(device)
    with atomic_directory(output, overwrite=overwrite) as staging:
        loaded = load_model(model, device)
        calibration = calibration_config(
            calibrate,
            calibration_samples,
            calibration_steps,
            snn_steps,
            neuron,
            set_size=calibration_set_size,
            budget_minutes=calibration_budget,
            burst=burst,
            output_precision=output_precision,
            output_filter=output_filter if loaded.kind == "ann" else None,
        )
        own_filter = int(loaded.unet.config.get("output_filter_size") or 0) if loaded.kind != "ann" else None
        if own_filter is not None and output_filter is not None and output_filter != own_filter:
            raise CommandError(
                f"--output-filter {output_filter}: {loaded.source} is a calibrated model with output filter size "
                f"{own_filter}; it keeps its own (leave the option out, or calibrate the ANN again).",
                2,
            )
        if loaded.kind == "ann" and burst and burst > 1:
            if neuron != "if":
                raise CommandError("--burst needs --neuron if: burst neurons are plain IF neurons.", 2)
            if levels not in (None, burst * timesteps):
                raise CommandError(f"--burst {burst} needs -L = B x T = {burst * timesteps} (or leave -L out).", 2)
            levels = burst * timesteps
        if threshold_form == "unit" and loaded.kind != "snn" and resolve_threshold_groups(threshold_groups, loaded) > 1:
            raise CommandError(
                "--threshold-form unit needs one threshold per site, but the QCFS network has timestep-aware "
                "thresholds (--threshold-groups > 1), which cannot be folded into static weights; use "
                "--threshold-form lambda.",
                2,
            )
        source = conversion_source(
            loaded,
            timesteps,
            calibration,
            levels=levels,
            per_channel=per_channel if option_given("per_channel") or loaded.kind == "ann" else None,
            residual_spikes=residual_spikes,
            threshold_groups=threshold_groups,
            offsets=offsets,
            seed=seed,
            output_precision=output_precision,
        )
        qnet, ann, calibration_report = source.qnet, source.ann, source.calibration_report
        if reference is not None:
            ann = _reference_ann(reference, qnet, device)
        try:
            snn = convert(
                qnet,
                spike_steps=timesteps,
                neuron=neuron,
                nonlinear_mode=nonlinear_mode,
                threshold_form=threshold_form,
                burst=burst,
                nonlinear_steps=nonlinear_steps,
                delta_spikes=delta_spikes is not False,
            )
        except ValueError as err:  # a setting this network cannot take (e.g. unit thresholds on a conditional UNet)
            raise CommandError(f"{loaded.source}: {err}", 2) from err
        report = {
            "source": loaded.source,
            "source_kind": loaded.kind,
            "converted": source.description,
            "calibrated_here": bool(calibration_report),
            "fidelity_reference": "ann" if ann is not None else "qcfs_as_ann",
            "settings": {
                "timesteps": timesteps,
                "levels": qnet.config.levels,
                "per_channel": qnet.config.per_channel,
                "neuron": neuron,
                "burst": int(snn.config.burst),
                "nonlinear_mode": nonlinear_mode,
                "nonlinear_steps": nonlinear_steps,
                "delta_spikes": bool(snn.config.delta_spikes),
                "threshold_form": threshold_form,
                "residual_spikes": bool(qnet.config.residual_spikes),
                "threshold_groups": int(qnet.config.threshold_groups),
                "offsets": bool(qnet.config.offsets),
                "output_precision": int(qnet.config.get("output_precision") or 1),
                "output_filter_size": int(qnet.config.get("output_filter_size") or 0),
                "seed": seed,
            },
            "summary": conversion_summary(qnet, snn),
            "fidelity": fidelity_check(
                snn, qnet, dict(loaded.scheduler.config), ann=ann, seed=seed, conditions=_label_conditions(loaded)
            ),
        }
        save_spiking_pipeline(loaded, snn, Path(staging))
        (Path(staging) / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
        if calibration_report:
            write_calibration_report(calibration_report, staging)
    _print_report(report, output)


def _label_conditions(loaded: LoadedModel, count: int = 4) -> dict[str, torch.Tensor] | None:
    """The fidelity check's conditioning for a label-conditional model: labels 0, 1, ... as its tokens."""
    tokens = loaded.label_tokens
    if tokens is None:
        return None
    with torch.no_grad():
        return {"encoder_hidden_states": tokens(torch.arange(count) % tokens.config.num_classes)}


def save_spiking_pipeline(loaded: LoadedModel, snn: torch.nn.Module, directory: Path) -> None:
    """Save ``snn`` as the pipeline ``loaded`` came in: a ``SpikingDiffusionPipeline`` (with the label tokens of
    a label-conditional model), or, for a pipeline with other components (Stable Diffusion's text encoder,
    tokenizer, VAE...), a copy of it with only the UNet replaced, which ``DiffusionPipeline.from_pretrained``
    loads as the original pipeline class."""
    if not loaded.components:
        pipe = SpikingDiffusionPipeline(unet=snn, scheduler=loaded.scheduler, label_tokens=loaded.label_tokens)
        pipe.save_pretrained(directory)
        return
    skip = {"unet", ".sdm-output.json", "conversion.json", REPORT_FILE, PLOT_FILE}
    for entry in loaded.root.iterdir():
        if entry.name in skip or entry.name.startswith(".cache"):
            continue
        target = directory / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
    snn.save_pretrained(directory / "unet")
    index = json.loads((loaded.root / "model_index.json").read_text())
    index["unet"] = [type(snn).__module__, type(snn).__name__]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _reference_ann(reference: str, qnet: QCFSUNet2DModel, device: torch.device) -> UNet2DModel:
    """The ``--reference`` ANN, checked to be the architecture the QCFS network was made from."""
    loaded = load_model(reference, device)
    if loaded.kind != "ann" or unet_config_dict(loaded.unet) != qnet.config.unet_config:
        raise CommandError(f"--reference {reference} is not the original UNet2DModel of the converted model.", 2)
    return loaded.unet


def _print_report(report: dict[str, Any], output: str) -> None:
    settings, summary = report["settings"], report["summary"]
    click.echo(f"Converted {report['converted']} ({report['source']})")
    click.echo(
        f"  T = {settings['timesteps']}, L = {settings['levels']}, neuron {settings['neuron']}, "
        f"{settings['threshold_form']}-form thresholds, GroupNorm/attention {settings['nonlinear_mode']}"
        + (", residual spikes" if settings.get("residual_spikes") else "")
        + (f", {groups} timestep threshold groups" if (groups := settings.get("threshold_groups", 1)) > 1 else "")
        + (", offsets" if settings.get("offsets") else "")
        + (f", output unit at {p} x the levels" if (p := settings.get("output_precision", 1)) > 1 else "")
        + (f", {k} x {k} output filter" if (k := settings.get("output_filter_size", 0)) else "")
        + (f", real-valued ops at {steps} of the T steps" if (steps := settings.get("nonlinear_steps")) else "")
        + (", delta spikes" if settings.get("delta_spikes") else "")
    )
    if report["calibrated_here"]:
        click.echo(f"  calibration report: {REPORT_FILE}, plot: {PLOT_FILE}")
    elif report["source_kind"] == "ann":
        click.echo("  --no-calibrate: a quick and poor network; calibrate for quality")
    sites = summary["sites"]
    click.echo(f"Sites: {sum(sites.values())} ({', '.join(f'{count} {kind}' for kind, count in sites.items())})")
    lam = summary["thresholds"]
    per = "per channel" if lam["per_channel"] else "per site"
    click.echo(
        f"Thresholds lambda ({lam['count']} values, {per}): "
        f"min {lam['min']:.4g}, median {lam['median']:.4g}, max {lam['max']:.4g}"
    )
    if "offsets" in summary:
        off = summary["offsets"]
        click.echo(
            f"Output offsets: min {off['offset_min']:.4g}, max {off['offset_max']:.4g}; "
            f"input shifts: min {off['shift_min']:.4g}, max {off['shift_max']:.4g}"
        )
    ops = ", ".join(f"{count} {name}" for name, count in summary["nonlinear_ops"].items()) or "none"
    click.echo(f"Real-valued non-linear ops ({summary['nonlinear_mode']}): {ops}")
    tsm = summary["tsm"]
    if tsm["enabled"]:
        ranges = ", ".join(
            f"{lo:.3g}..{hi:.3g}" for lo, hi in zip(tsm["min_per_step"], tsm["max_per_step"], strict=True)
        )
        click.echo(f"Temporal factors (TSM) per step, min..max over neurons: {ranges}")
    else:
        click.echo("Temporal factors (TSM): off")
    reference = "the ANN"
    if report["fidelity_reference"] == "qcfs_as_ann":
        reference = "the QCFS weights with the original activations (pass --reference for the original ANN)"
    click.echo(f"Fidelity: relative error of the noise prediction vs {reference} (4 fixed-seed noised inputs)")
    click.echo(f"  {'t':>5}  {'QCFS L=' + str(settings['levels']):>10}  {'SNN T=' + str(settings['timesteps']):>10}")
    for row in report["fidelity"]:
        click.echo(f"  {row['t']:>5}  {row['qcfs_vs_ann']:>10.4f}  {row['snn_vs_ann']:>10.4f}")
    click.echo(f"Wrote {output}; sample it with: sdm-sample --model {output}")
