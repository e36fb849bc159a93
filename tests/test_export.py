"""ONNX export: the QCFS network, the unrolled SNN and the single-step graph against PyTorch, the step
graph driven by a stateful loop, and ``sdm-export`` end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CONFIGS, make_inputs, make_unet, relative_error
from spiking_diffusers import convert, quantize
from spiking_diffusers.commands.export import main as export_main
from spiking_diffusers.export import (
    TOLERANCE,
    ExportCheck,
    SpikingStep,
    export_qcfs,
    export_snn,
    export_step,
    onnx_export,
)
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
    ("error", "sensitivity", "tolerance", "status"),
    [
        (1e-6, 1e-6, TOLERANCE, "ok"),
        (1e-6, 0.3, TOLERANCE, "ok"),  # onnxruntime met the tolerance even where rounding could have flipped levels
        (0.5, 1e-6, TOLERANCE, "FAILED"),
        (0.5, 0.3, TOLERANCE, "float32-sensitive"),
        (0.5, 0.01, TOLERANCE, "FAILED"),  # PyTorch is sensitive, but 50 times less than the error: not rounding
        (1e-6, 1e-6, None, "reported"),
    ],
)
def test_only_an_error_within_the_tolerance_passes(tmp_path, error, sensitivity, tolerance, status):
    """A large error fails where PyTorch is stable to rounding; where it is not, the graph is unverified: not
    failed, and not passed either."""
    check = ExportCheck("qcfs", tmp_path, error, error, sensitivity, tolerance, 2, 3, 0.0)
    assert check.status == status
    assert check.passed == (status == "ok") and check.failed == (status == "FAILED")


def perturb_exported_weights(monkeypatch, offset: float = 0.01) -> None:
    """Make every export write a graph whose output convolution's weights are off by ``offset``: a wrong graph."""
    original = onnx_export._export

    def export_then_perturb(module, inputs, path, *names):
        original(module, inputs, path, *names)
        graph = onnx.load(str(path))
        weight = next(init for init in graph.graph.initializer if init.name.endswith("conv_out.weight"))
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + offset, weight.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(onnx_export, "_export", export_then_perturb)


def test_a_wrong_graph_fails_the_check(tmp_path, tiny, monkeypatch):
    _, qnet, snn = tiny
    perturb_exported_weights(monkeypatch)
    qcfs = export_qcfs(qnet, tmp_path / "qcfs.onnx")
    step, _ = export_step(snn, tmp_path / "step.onnx")
    for check in (qcfs, step):
        assert check.float32_sensitivity <= TOLERANCE < check.max_abs_error
        assert check.status == "FAILED" and check.failed and not check.passed
    # Below float32 rounding PyTorch is "sensitive" too, but not by enough to explain the wrong weights.
    monkeypatch.setattr(onnx_export, "TOLERANCE", 1e-12)
    qcfs = export_qcfs(qnet, tmp_path / "qcfs.onnx")
    assert qcfs.float32_sensitivity > qcfs.tolerance and qcfs.status == "FAILED"


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    tiny[1].save_pretrained(root / "qcfs")
    tiny[2].save_pretrained(root / "snn")
    return root


def test_sdm_export_exits_1_on_a_wrong_graph(tmp_path, saved, monkeypatch):
    perturb_exported_weights(monkeypatch)
    args = ["--model", str(saved / "qcfs"), "--which", "qcfs", "--output", str(tmp_path)]
    result = CliRunner().invoke(export_main, args)
    assert result.exit_code == 1, result.output
    assert "tolerance 0.0001: FAILED" in result.output and "Error: qcfs: onnxruntime differs" in result.output
    assert json.loads((tmp_path / "export.json").read_text())["graphs"]["qcfs"]["status"] == "FAILED"


def test_sdm_export_warns_where_float32_rounding_alone_exceeds_the_tolerance(tmp_path, saved, monkeypatch):
    """A tolerance below the step graph's float32 rounding: onnxruntime misses it, and so does PyTorch's own
    float32 against float64, so the comparison cannot vouch for the graph: it is written, marked unverified in
    export.json, and a warning says so."""
    monkeypatch.setattr(onnx_export, "TOLERANCE", 1e-7)
    args = ["--model", str(saved / "snn"), "--which", "step", "--output", str(tmp_path)]
    result = CliRunner().invoke(export_main, args)
    assert result.exit_code == 0, result.output
    assert "Warning: step NOT VERIFIED" in result.output, result.output
    entry = json.loads((tmp_path / "export.json").read_text())["graphs"]["step"]
    assert entry["status"] == "float32-sensitive" and entry["verified"] is False
    assert entry["max_abs_error"] > 1e-7 and entry["pytorch_float32_vs_float64"] > 1e-7


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
        export_main, ["--model", str(tmp_path / "ann"), "--output", str(tmp_path / "onnx"), "-T", "2", "--no-calibrate"]
    )
    assert result.exit_code == 0, result.output
    assert "max abs error" in result.output and "FAILED" not in result.output and "Warning" not in result.output
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert {"qcfs", "snn", "step"} == set(manifest["graphs"]) and manifest["graphs"]["snn"]["timesteps"] == 2
    for entry in manifest["graphs"].values():
        assert (tmp_path / "onnx" / entry["file"]).is_file()
    assert [manifest["graphs"][name]["status"] for name in ("qcfs", "snn", "step")] == ["ok", "reported", "ok"]
    assert manifest["graphs"]["qcfs"]["verified"] and manifest["graphs"]["step"]["verified"]
    assert manifest["graphs"]["step"]["inputs"][:3] == ["sample", "timestep", "step"]
    assert (tmp_path / "onnx" / "snn_step_initial_state.npz").is_file()

    snn.save_pretrained(tmp_path / "snn")
    refused = CliRunner().invoke(
        export_main, ["--model", str(tmp_path / "snn"), "--which", "qcfs", "--output", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "qcfs graph needs" in refused.output
    bad = CliRunner().invoke(export_main, ["--which", "onnx", "--output", str(tmp_path / "y")])
    assert bad.exit_code == 2
