"""ONNX export: the QCFS network, the unrolled SNN and the single-step graph against PyTorch, the step
graph driven by a stateful loop, and ``sdm-export`` end to end."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CONFIGS, make_inputs, make_unet, relative_error
from spiking_diffusers import convert, quantize
from spiking_diffusers.commands.export import main as export_main
from spiking_diffusers.export import TOLERANCE, ExportCheck, SpikingStep, export_qcfs, export_snn, export_step
from spiking_diffusers.export.onnx_export import random_inputs


@pytest.fixture(scope="module")
def tiny():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=4, num_samples=2)
    return unet, qnet, convert(qnet, timesteps=4, neuron="signed_if")


def test_qcfs_and_unrolled_snn_graphs_match_pytorch(tmp_path, tiny):
    _, qnet, snn = tiny
    qcfs = export_qcfs(qnet, tmp_path / "qcfs.onnx")
    unrolled = export_snn(snn, tmp_path / "snn.onnx")
    assert (qcfs.export_batch, qcfs.check_batch) == (2, 3)  # dynamic batch
    assert qcfs.passed and qcfs.max_abs_error <= TOLERANCE
    # no tolerance by design (spike flips), but on this model no neuron sits within rounding of its threshold
    assert unrolled.tolerance is None and unrolled.max_abs_error <= TOLERANCE


@pytest.mark.parametrize(
    ("error", "sensitivity", "status"),
    [(1e-6, 1e-6, "ok"), (0.5, 1e-6, "FAILED"), (0.5, 0.3, "float32-sensitive")],
)
def test_a_large_error_fails_only_where_pytorch_itself_is_stable_to_rounding(tmp_path, error, sensitivity, status):
    check = ExportCheck("qcfs", tmp_path, error, error, sensitivity, TOLERANCE, 2, 3, 0.0)
    assert check.status == status and check.passed == (status != "FAILED")


@pytest.mark.parametrize(
    "settings", [{}, {"neuron": "signed_if", "threshold_form": "unit"}, {"nonlinear_mode": "per_step"}]
)
def test_step_module_iterated_T_times_is_the_stepwise_snn(settings):
    unet = make_unet(TINY_CONFIGS["attention"])
    snn = convert(quantize(unet, levels=4, num_samples=2), timesteps=4, execution="stepwise", **settings)
    sample, timestep, _ = make_inputs(unet)
    step = SpikingStep(snn)
    with torch.no_grad():
        state = step.initial_state(sample, timestep)
        outputs = []
        for _ in range(4):
            out, *state = step(sample, timestep, *state)
            outputs.append(out)
        reference = snn(sample, timestep).sample
    assert float(state[0]) == 4  # the step index
    assert relative_error(torch.stack(outputs).mean(0), reference) < 1e-12


def test_step_graph_in_a_stateful_loop_reproduces_the_snn(tmp_path, tiny):
    """Run the exported step T times from the shipped initial state, as a stateful runtime would."""
    _, _, snn = tiny
    check, initial = export_step(snn, tmp_path / "step.onnx")
    assert check.passed and check.max_abs_error <= TOLERANCE
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    sample, timestep = random_inputs(snn, 3, seed=5)
    state = {name: value if name == "step" else np.repeat(value, 3, axis=0) for name, value in initial.items()}
    outputs = []
    for _ in range(snn.config.timesteps):
        results = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(), **state}),
                strict=True,
            )
        )
        outputs.append(results["output"])
        state = {name: results[f"next.{name}"] for name in state}
    with torch.no_grad():
        reference = snn(sample, timestep).sample.numpy()
    assert state["step"][0] == snn.config.timesteps
    assert np.abs(np.mean(outputs, axis=0) - reference).max() <= TOLERANCE


def test_sdm_export_end_to_end(tmp_path, tiny):
    unet, _, snn = tiny
    unet.save_pretrained(tmp_path / "ann")
    result = CliRunner().invoke(
        export_main, ["--model", str(tmp_path / "ann"), "--output", str(tmp_path / "onnx"), "-T", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "max abs error" in result.output and "FAILED" not in result.output
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert {"qcfs", "snn", "step"} == set(manifest["graphs"]) and manifest["graphs"]["snn"]["timesteps"] == 2
    for entry in manifest["graphs"].values():
        assert (tmp_path / "onnx" / entry["file"]).is_file()
    assert manifest["graphs"]["step"]["inputs"][:3] == ["sample", "timestep", "step"]
    assert (tmp_path / "onnx" / "snn_step_initial_state.npz").is_file()

    snn.save_pretrained(tmp_path / "snn")
    refused = CliRunner().invoke(
        export_main, ["--model", str(tmp_path / "snn"), "--which", "qcfs", "--output", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "qcfs graph needs" in refused.output
    bad = CliRunner().invoke(export_main, ["--which", "onnx", "--output", str(tmp_path / "y")])
    assert bad.exit_code == 2
