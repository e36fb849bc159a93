"""``sdm-export``: a converted UNet as ONNX graphs, each checked against PyTorch with onnxruntime.

Writes, per ``--which``: ``qcfs.onnx`` (the QCFS network as a quantized ANN), ``snn_T<T>.onnx`` (the
spiking network with its T time steps unrolled), ``snn_step.onnx`` with ``snn_step_initial_state.npz``
(one time step, state in and out; the initial state is for batch 1, repeat it along axis 0), and
``export.json`` (opset, inputs, outputs, state names, the errors measured).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import click
import numpy as np

from ..calibration.calibrate import CalibrationConfig
from ..cli import (
    BoundedInt,
    CommandError,
    atomic_directory,
    calibration_config,
    calibration_options,
    check_output,
    conversion_source,
    device_option,
    get_device,
    model_option,
    option_given,
    output_options,
    residual_spikes_option,
    sdm_command,
)
from ..converter import convert
from ..converter.timestep_groups import schedule_length
from ..export import OPSET, ExportCheck, export_qcfs, export_snn, export_step
from ..export.onnx_export import step_io_names
from ..export.stepping import SpikingStep
from ..loading import LoadedModel, load_model

GRAPHS = ("qcfs", "snn", "step")

EXAMPLES = """
\b
Examples:
  sdm-export --output onnx                                  # the shipped digits model, T = 4, all three graphs
  sdm-export --model digits-snn --which snn,step --output onnx-snn     # a model saved by sdm-convert
"""


def parse_which(value: str) -> list[str]:
    """``--which``: ``"step,qcfs"`` -> ``["qcfs", "step"]`` (in :data:`GRAPHS` order), a usage error otherwise."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in GRAPHS]
    if unknown or not names:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(GRAPHS)}, got {value!r}")
    return [name for name in GRAPHS if name in names]


@sdm_command("sdm-export", epilog=EXAMPLES)
@model_option(
    "Hub id or local directory of an ANN, QCFS or spiking model (an ANN is quantized with percentile "
    "thresholds and converted first). Default: the digits DDPM shipped in the package."
)
@output_options("Directory for the ONNX files.")
@click.option(
    "--spike-steps",
    "--timesteps",
    "-T",
    "timesteps",
    default=4,
    type=BoundedInt("timesteps"),
    help="SNN time steps T, unrolled in the snn graph (for a spiking model: its own T unless given).",
)
@click.option("--levels", "-L", default=None, type=BoundedInt("levels"), help="QCFS levels L of an ANN [default: T].")
@click.option("--which", default=",".join(GRAPHS), help="Graphs to export: a comma-separated subset of qcfs,snn,step.")
@click.option("--seed", default=0, type=BoundedInt("seed"), help="Seed of the threshold probes and the check inputs.")
@residual_spikes_option()
@calibration_options
@device_option(
    "Where the model is loaded, probed and converted (auto picks CUDA, then MPS, then CPU); the ONNX graphs are "
    "traced and checked on the CPU in float32 whatever the device."
)
def main(
    model, output, overwrite, timesteps, levels, which, seed, residual_spikes, calibrate, calibration_samples,
    calibration_steps, snn_steps, calibration_set_size, calibration_budget, device,
) -> None:  # fmt: skip
    """Export the QCFS network, the unrolled spiking network and its single time step to ONNX."""
    check_output(output, overwrite, {"--model": model})
    graphs = parse_which(which)
    loaded = load_model(model, get_device(device))
    calibration = calibration_config(
        calibrate,
        calibration_samples,
        calibration_steps,
        snn_steps,
        set_size=calibration_set_size,
        budget_minutes=calibration_budget,
    )
    qnet, snn = _networks(loaded, timesteps, levels, seed, residual_spikes, calibration)
    if qnet is None:
        if option_given("which") and "qcfs" in graphs:
            raise CommandError(
                f"{loaded.source} is a spiking model; the qcfs graph needs the original or the QCFS model.", 2
            )
        graphs = [name for name in graphs if name != "qcfs"]
        click.echo("qcfs skipped: a spiking model holds no QCFS network (pass the original or the QCFS model).")
    if loaded.cross_attention and "step" in graphs:
        if option_given("which"):
            raise CommandError(
                f"--which step: {loaded.source} is a conditional UNet, whose single-step graph is not supported yet; "
                "export its qcfs and snn graphs.",
                2,
            )
        graphs = [name for name in graphs if name != "step"]
        click.echo("step skipped: the single-step graph of a conditional UNet is not supported yet.")
    graph_inputs = ["sample", "timestep"] + (["encoder_hidden_states"] if loaded.cross_attention else [])
    checks: list[ExportCheck] = []
    manifest = {
        "source": loaded.source,
        "source_kind": loaded.kind,
        "residual_spikes": bool(snn.config.residual_spikes),
        "opset": OPSET,
        "graphs": {},
    }
    with atomic_directory(output, overwrite=overwrite) as staging:
        staging = Path(staging)
        if "qcfs" in graphs:
            checks.append(export_qcfs(qnet, staging / "qcfs.onnx", seed))
            manifest["graphs"]["qcfs"] = _entry(checks[-1], graph_inputs, ["output"])
        if "snn" in graphs:
            checks.append(export_snn(snn, staging / f"snn_T{snn.config.timesteps}.onnx", seed))
            manifest["graphs"]["snn"] = _entry(checks[-1], graph_inputs, ["output"])
            manifest["graphs"]["snn"]["timesteps"] = snn.config.timesteps
        if "step" in graphs:
            check, initial = export_step(snn, staging / "snn_step.onnx", seed)
            checks.append(check)
            np.savez(staging / "snn_step_initial_state.npz", **initial)
            inputs, outputs = step_io_names(SpikingStep(snn))
            manifest["graphs"]["step"] = _entry(check, inputs, outputs)
            manifest["graphs"]["step"]["initial_state"] = _initial_state_note(snn)
        for check in checks:  # paths as they will be after the rename into place
            manifest["graphs"][check.name]["file"] = check.path.name
        (staging / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _print(checks, snn, output)
    failed = [check.name for check in checks if check.failed]
    if failed:
        raise CommandError(
            f"{', '.join(failed)}: onnxruntime differs from PyTorch beyond the tolerance and beyond what float32 "
            "rounding explains (PyTorch's own float32 vs float64 difference): the export is wrong. Files kept for "
            "inspection."
        )
    unverified = [check for check in checks if check.status == "float32-sensitive"]
    if unverified:
        click.echo(
            f"Warning: {', '.join(check.name for check in unverified)} NOT VERIFIED: onnxruntime differs from "
            f"PyTorch by up to {max(check.max_abs_error for check in unverified):.3g}, beyond the tolerance, but "
            "PyTorch itself moves by as much between float32 and float64, so this check cannot tell a wrong graph "
            "from rounding flips.",
            err=True,
        )


def _networks(
    loaded: LoadedModel,
    timesteps: int,
    levels: int | None,
    seed: int,
    residual_spikes: bool | None,
    calibration: CalibrationConfig | None,
):
    """``(qnet, snn)``: the QCFS network (``None`` for a spiking model) and the spiking network, made as
    ``sdm-convert`` makes them (an ANN is calibrated first unless ``--no-calibrate``). A spiking model is
    exported as it is; ``--timesteps`` sets the T of the unrolled graph on a copy, never on the loaded model."""
    if loaded.kind == "snn":
        snn = loaded.unet
        if residual_spikes is not None and residual_spikes != bool(snn.config.residual_spikes):
            raise CommandError(f"--residual-spikes: {loaded.source} is a spiking model; it keeps its own setting.", 2)
        click.echo(f"Exporting a spiking model as given ({loaded.source})")
        if option_given("timesteps") and timesteps != snn.config.timesteps:
            snn = copy.deepcopy(snn)
            snn.register_to_config(timesteps=timesteps)
        return None, snn
    source = conversion_source(
        loaded, timesteps, calibration, levels=levels, residual_spikes=residual_spikes, seed=seed
    )
    return source.qnet, convert(source.qnet, spike_steps=timesteps)


def _initial_state_note(snn) -> str:
    """How a runtime takes the initial state of the step graph from the ``.npz``."""
    groups = int(snn.config.threshold_groups)
    if groups == 1:
        return "snn_step_initial_state.npz (batch 1; repeat along axis 0)"
    length = schedule_length(snn.config.unet_config)
    return (
        f"snn_step_initial_state.npz ({groups} rows, one per timestep-aware threshold group: give each sample row "
        f"g = min(floor(timestep * {groups} / {length}), {groups - 1}))"
    )


def _entry(check: ExportCheck, inputs: list[str], outputs: list[str]) -> dict:
    return {
        "inputs": inputs,
        "outputs": outputs,
        "max_abs_error": check.max_abs_error,
        "mean_abs_error": check.mean_abs_error,
        "pytorch_float32_vs_float64": check.float32_sensitivity,
        "tolerance": check.tolerance,
        "status": check.status,
        "verified": check.passed,
        "export_batch": check.export_batch,
        "check_batch": check.check_batch,
        "export_seconds": round(check.seconds, 2),
    }


def _print(checks: list[ExportCheck], snn, output: str) -> None:
    click.echo(f"ONNX opset {OPSET}; each graph exported at batch 2 and checked at batch 3 with onnxruntime")
    for check in checks:
        verdict = "no tolerance" if check.tolerance is None else f"tolerance {check.tolerance:g}: {check.status}"
        click.echo(
            f"  {check.name:<5} {check.path.name:<16} max abs error {check.max_abs_error:.3g} "
            f"(mean {check.mean_abs_error:.3g}; {verdict}); PyTorch float32 vs float64: {check.float32_sensitivity:.3g}"
        )
    if any(check.status in ("reported", "float32-sensitive") for check in checks):
        click.echo(
            "  Quantization levels and spikes decided within float rounding of their boundary can flip between "
            "runtimes; where PyTorch's own float32 vs float64 difference is as large, that is the cause."
        )
    click.echo(f"T = {snn.config.timesteps}. Wrote {output}/ (export.json lists inputs, outputs and state names)")
