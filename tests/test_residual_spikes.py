"""Residual spikes: signed QCFS encoders in front of the convolutions that read the residual stream and of the
attention projections, their ternary IF neurons, and everything that must keep working with them
(calibration, threshold forms, I/O, energy, ONNX, CLI)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from conftest import TINY_CONFIGS, make_inputs, make_unet, relative_error
from spiking_diffusers import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate
from spiking_diffusers.calibration.distill import DistillSettings
from spiking_diffusers.commands import calibrate as calibrate_command
from spiking_diffusers.commands import convert as convert_command
from spiking_diffusers.converter.encoders import SignedQCFS, signed_qcfs
from spiking_diffusers.converter.neurons import TernaryIFEncoder
from spiking_diffusers.converter.thresholds import mse_threshold
from spiking_diffusers.energy.accounting import OperationCounter
from spiking_diffusers.evaluation import VariantError, prepare_variants
from spiking_diffusers.export import SpikingStep, export_qcfs, export_step

ENCODED = {
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.0.resnets.0.conv_shortcut",
    "up_blocks.0.resnets.1.conv_shortcut",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.resnets.1.conv_shortcut",
}
"""The residual-reading convolutions of the tiny "attention" UNet."""
ATTENTIONS = [
    "down_blocks.1.attentions.0",
    "mid_block.attentions.0",
    "up_blocks.0.attentions.0",
    "up_blocks.0.attentions.1",
]
"""Its attention modules, each split at its projections."""
ENCODERS = {f"{name}.encoder" for name in ENCODED} | {
    f"{name}.{which}_encoder" for name in ATTENTIONS for which in ("input", "output")
}


def simulate(neuron: TernaryIFEncoder, steps: torch.Tensor) -> torch.Tensor:
    """Mean output of ``neuron`` over the ``(T, ...)`` input currents ``steps`` (batched execution)."""
    neuron.begin(steps.shape[0], "batched")
    with torch.no_grad():
        return neuron(steps.flatten(0, 1)).unflatten(0, steps.shape[:2]).mean(0)


def run(model, unet, **extra):
    sample, timestep, kwargs = make_inputs(unet)
    with torch.no_grad():
        return model(sample, timestep, **kwargs, **extra).sample


def test_signed_qcfs_levels_clipping_and_gradients():
    lam = torch.tensor([2.0], requires_grad=True)
    z = torch.tensor([-3.0, -1.4, -0.6, -0.4, 0.3, 0.6, 1.4, 3.0], requires_grad=True)
    # L = 2, lambda = 2: levels -2, -1, 0, 1, 2, rounded (phi = 1/2) and clipped symmetrically
    out = signed_qcfs(z, lam, levels=2)
    assert out.tolist() == [-2.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 2.0]
    out.sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # lambda: -1 and +1 where it saturates, (level - z * L / lambda) / L inside
    inside = [(-1, -1.4), (-1, -0.6), (0, -0.4), (0, 0.3), (1, 0.6), (1, 1.4)]
    inside = sum(level - v for level, v in inside) / 2
    assert lam.grad.item() == pytest.approx(-1.0 + 1.0 + inside, abs=1e-6)


@pytest.mark.parametrize("phi", [0.0, 0.5])
@pytest.mark.parametrize("levels", [1, 2, 4, 8])
def test_theorem1_analogue_constant_input_T_equals_L_reproduces_signed_qcfs(levels, phi):
    neuron = TernaryIFEncoder(channels=1, phi=phi).double()
    neuron.threshold.data.fill_(1.5)
    # an even count keeps 0 off the grid: a level boundary at phi = 0, where linspace gives -6e-17
    z = torch.linspace(-3.0, 3.0, 2000, dtype=torch.float64).reshape(-1, 1)
    expected = signed_qcfs(z, torch.tensor([1.5], dtype=torch.float64), levels, phi)
    assert torch.allclose(simulate(neuron, z.expand(levels, -1, -1)), expected, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 5, 16])
def test_mean_output_is_unbiased_and_within_half_a_level_of_the_mean_input(steps):
    """Any input sequence inside the range: the spikes carry the input's sum up to the final membrane."""
    generator = torch.Generator().manual_seed(steps)
    currents = (torch.rand(steps, 20000, 1, generator=generator, dtype=torch.float64) * 2 - 1) * 0.9
    neuron = TernaryIFEncoder(channels=1).double()  # threshold 1, v(0) = 1/2
    error = simulate(neuron, currents) - currents.mean(0)
    assert error.abs().max().item() <= 0.5 / steps + 1e-12
    assert abs(error.mean().item()) < 0.05 / steps


def test_stepwise_equals_batched_single_layer_per_channel():
    neuron = TernaryIFEncoder(channels=3, per_channel=True).double()
    neuron.threshold.data = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    currents = torch.randn(6, 5, 3, 4, 4, dtype=torch.float64)
    neuron.begin(6, "stepwise")
    with torch.no_grad():
        stepwise = torch.stack([neuron(current) for current in currents]).mean(0)
    assert torch.equal(simulate(neuron, currents), stepwise)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_encoders_sit_in_front_of_the_residual_convs_and_the_ann_mode_is_exact(name):
    unet = make_unet(TINY_CONFIGS[name])
    qnet = quantize(unet, levels=4, residual_spikes=True)
    encoders = {n: u for n, u in qnet.sites().items() if isinstance(u, SignedQCFS)}
    assert encoders and all(u.threshold.item() != 1.0 for u in encoders.values())
    if name == "attention":
        assert set(encoders) == ENCODERS
    with qnet.as_ann():
        assert torch.equal(run(qnet, unet), run(unet, unet))
    plain = quantize(unet, levels=4)
    assert not any(isinstance(u, SignedQCFS) for u in plain.sites().values())
    assert relative_error(run(qnet, unet), run(plain, unet)) > 1e-3  # the encoders quantize


@pytest.mark.parametrize("name", ["attention", "skip_fourier"])
def test_snn_approaches_qcfs_as_T_equals_L_grows(name):
    unet = make_unet(TINY_CONFIGS[name])
    errors = []
    for steps in (4, 16, 64):
        qnet = quantize(unet, levels=steps, residual_spikes=True)
        errors.append(relative_error(run(convert(qnet, timesteps=steps), unet), run(qnet, unet)))
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_batched_equals_stepwise_and_unit_form_equals_lambda_form(name):
    unet = make_unet(TINY_CONFIGS[name])
    qnet = quantize(unet, levels=4, per_channel=True, residual_spikes=True)
    snn = convert(qnet, timesteps=5)
    assert any(isinstance(u, TernaryIFEncoder) for u in snn.sites().values())
    batched = run(snn, unet)
    snn.set_execution("stepwise")
    assert torch.allclose(run(snn, unet), batched, atol=1e-10)
    unit_form = convert(qnet, timesteps=5, threshold_form="unit")
    assert all(torch.all(u.threshold == 1) for u in unit_form.sites().values() if isinstance(u, TernaryIFEncoder))
    assert torch.allclose(run(unit_form, unet), batched, atol=1e-10)


def test_save_and_load_round_trip_is_exact(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=4, per_channel=True, residual_spikes=True)
    snn = convert(qnet, timesteps=4, threshold_form="unit")
    qnet.save_pretrained(tmp_path / "qcfs")
    snn.save_pretrained(tmp_path / "snn")
    loaded_q = QCFSUNet2DModel.from_pretrained(tmp_path / "qcfs")
    loaded = SpikingUNet2DModel.from_pretrained(tmp_path / "snn")
    assert loaded_q.config.residual_spikes and loaded.config.residual_spikes
    assert torch.equal(run(loaded_q, unet), run(qnet, unet))
    assert torch.equal(run(loaded, unet), run(snn, unet))


def test_energy_counts_the_encoded_layers_as_spike_driven_acs():
    unet = make_unet(TINY_CONFIGS["attention"])
    sample, timestep, _ = make_inputs(unet)
    counts = {}
    for residual_spikes in (False, True):
        snn = convert(quantize(unet, levels=4, residual_spikes=residual_spikes), timesteps=4)
        with torch.no_grad(), OperationCounter(snn) as counter:
            snn(sample, timestep)
        counts[residual_spikes] = counter.accounting
    plain, encoded = counts[False], counts[True]
    for name in ENCODED:
        layer = encoded.layers[(name, "conv1x1" if "shortcut" in name else "conv3x3")]
        assert layer.spike_driven and layer.acs > 0 and layer.macs == 0
        assert not plain.layers[(name, layer.op)].spike_driven
        assert encoded.sites[f"{name}.encoder"].spikes == layer.input_spikes > 0
    for name in ATTENTIONS:
        projections = [encoded.layers[(f"{name}.{layer}", "linear")] for layer in ("to_q", "to_k", "to_v", "to_out.0")]
        assert all(layer.spike_driven and layer.acs > 0 and layer.macs == 0 for layer in projections)
        assert projections[0].input_spikes == encoded.sites[f"{name}.input_encoder"].spikes
        # the products stay real-valued, reported under the attention's name as in the unsplit network
        assert encoded.layers[(name, "attention matmul")].macs == plain.layers[(name, "attention matmul")].macs
    fraction = {key: c.acs / (c.acs + c.macs) for key, c in counts.items()}
    assert fraction[True] > fraction[False] and encoded.macs < plain.macs


def test_mse_threshold_of_a_signed_encoder_finds_the_grid_of_its_input():
    grid = torch.arange(-4, 5, dtype=torch.float32) / 4  # the 9 levels of L = 4, lambda = 1
    values = torch.stack([(grid * 1.5).repeat(40), (grid * 0.25).repeat(40)])
    lam = mse_threshold(values, torch.nn.Identity(), levels=4, per_channel=True, signed=True)
    assert lam.tolist() == pytest.approx([1.5, 0.25], rel=1e-5)


def test_calibration_initialises_and_trains_the_encoders(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    config = CalibrationConfig(
        timesteps=2,
        num_samples=16,
        sampler_steps=2,
        stats_batches=1,
        residual_spikes=True,
        distill=DistillSettings(steps=4, batch_size=4),
        snn=DistillSettings(steps=2, batch_size=4, lr=1e-2),
        cache_dir=str(tmp_path),
    )
    scheduler_config = dict(DDPMScheduler(num_train_timesteps=1000).config)
    result = calibrate(unet, scheduler_config, config, progress=False)
    assert result.qnet.config.residual_spikes and result.report["settings"]["residual_spikes"]
    for name in ENCODERS:
        site = result.report["sites"][name]
        assert site["before"]["threshold"] != site["after"]["threshold"]
        assert site["after"]["quantization_mse"] > 0
    snn_sites = convert(result.qnet, timesteps=2).sites()
    assert all(isinstance(snn_sites[name], TernaryIFEncoder) for name in ENCODERS)


def test_sdm_calibrate_summary_counts_the_attention_encoders_too(capsys):
    """Encoders are counted by type: ``<attention>.input_encoder`` / ``.output_encoder`` do not end in ``.encoder``."""
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    for qnet, encoders in ((quantize(unet, levels=2, residual_spikes=True), ENCODERS), (quantize(unet, levels=2), {})):
        sites = qnet.sites()
        mse = {"quantization_mse": 0.5}
        report = {"sites": {name: {"before": mse, "after": mse} for name in sites}, "loss_curves": {}, "wall_time_s": 3}
        calibrate_command.print_summary(report, "out", qnet)
        first = capsys.readouterr().out.splitlines()[0]
        expected = f"Calibrated {len(sites) - len(encoders)} activation sites"
        expected += f" and {len(encoders)} residual input encoders" if encoders else ""
        assert first == f"{expected} in 3 s.", first


def test_onnx_graphs_and_the_step_module_carry_the_encoders(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=4, num_samples=2, residual_spikes=True)
    snn = convert(qnet, timesteps=4)
    assert export_qcfs(qnet, tmp_path / "qcfs.onnx").passed
    check, initial = export_step(snn, tmp_path / "step.onnx")
    assert check.passed and {f"{name}.membrane" for name in ENCODERS} <= set(initial)

    snn = convert(quantize(make_unet(TINY_CONFIGS["attention"]), levels=4, residual_spikes=True), timesteps=4)
    snn.set_execution("stepwise")
    sample, timestep, _ = make_inputs(unet)
    sample = sample.double()
    step = SpikingStep(snn)
    with torch.no_grad():
        state = step.initial_state(sample, timestep)
        outputs = []
        for _ in range(4):
            out, *state = step(sample, timestep, *state)
            outputs.append(out)
        assert relative_error(torch.stack(outputs).mean(0), snn(sample, timestep).sample) < 1e-12


def test_sdm_convert_option_and_its_conflict_with_a_qcfs_model(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    unet.save_pretrained(tmp_path / "ann")
    out = tmp_path / "snn"
    result = CliRunner().invoke(
        convert_command.main,
        ["--model", str(tmp_path / "ann"), "-T", "2", "--no-calibrate", "--residual-spikes", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "residual spikes" in result.output and "15 ternary IF encoder" in result.output
    report = json.loads((out / "conversion.json").read_text())
    assert report["settings"]["residual_spikes"] and report["summary"]["sites"]["ternary IF encoder"] == 15
    assert report["summary"]["nonlinear_ops"] == {"AttentionCore": 4, "GroupNorm": 21}
    assert SpikingUNet2DModel.from_pretrained(out, subfolder="unet").config.residual_spikes

    quantize(unet, levels=2).save_pretrained(tmp_path / "qcfs")
    refused = CliRunner().invoke(
        convert_command.main, ["--model", str(tmp_path / "qcfs"), "--residual-spikes", "--output", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "without residual spikes" in refused.output


def test_evaluation_variants_follow_the_option_and_refuse_to_change_a_model():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    variants = prepare_variants(unet, None, [2], residual_spikes=True)
    assert [v.unet.config.residual_spikes for v in variants[1:]] == [True, True]
    with pytest.raises(VariantError, match="has residual spikes"):
        prepare_variants(variants[1].unet, unet, [2], residual_spikes=False)
