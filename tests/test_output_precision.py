"""Output precision: the output activation (in front of conv_out) with P x the levels and P x the spikes per step."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CONFIGS, make_conditional, make_inputs, make_unet, relative_error
from spiking_diffusers import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig
from spiking_diffusers.commands import calibrate as calibrate_command
from spiking_diffusers.commands import convert as convert_command
from spiking_diffusers.converter.blocks import OUTPUT_SITE
from spiking_diffusers.energy.accounting import OperationCounter


def _levels(model) -> dict[str, int]:
    return {name: unit.levels for name, unit in model.sites().items() if hasattr(unit, "levels")}


def test_only_the_output_unit_gets_more_levels_and_it_saves(tmp_path):
    qnet = quantize(make_unet(TINY_CONFIGS["attention"]), levels=8, output_precision=4)
    levels = _levels(qnet)
    assert levels.pop(OUTPUT_SITE) == 32
    assert set(levels.values()) == {8}
    qnet.save_pretrained(tmp_path)
    loaded = QCFSUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert loaded.config.output_precision == 4 and loaded.sites()[OUTPUT_SITE].levels == 32
    config = json.loads((tmp_path / "config.json").read_text())
    del config["output_precision"]  # a model saved before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert QCFSUNet2DModel.from_pretrained(tmp_path).sites()[OUTPUT_SITE].levels == 8


def test_spiking_output_neurons_send_p_times_the_spikes_and_follow_the_qcfs_net(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"])
    sample, timestep, kwargs = make_inputs(unet)
    qnet = quantize(unet, levels=16, output_precision=4)
    qnet.register_to_config(burst=4)
    snn = convert(qnet, timesteps=4)
    assert snn.config.output_precision == 4
    bursts = {name: neuron.spikes_per_step for name, neuron in snn.neurons().items()}
    assert bursts.pop(OUTPUT_SITE) == 16 and set(bursts.values()) == {4}
    # Only the output site spiking, everything else as in the QCFS network: its input is constant over the T
    # steps, so 16 spikes per step over T = 4 reproduce the unit's 64 levels, and 4 per step (16 levels) do not.
    only_output = convert(qnet, timesteps=4, filter_fn=lambda site: site.name == OUTPUT_SITE)
    with torch.no_grad():
        reference = qnet(sample, timestep, **kwargs).sample
        assert relative_error(only_output(sample, timestep, **kwargs).sample, reference) < 1e-9
        only_output.unet.conv_act.spikes_per_step = 4  # what a conversion that dropped the output precision builds
        assert relative_error(only_output(sample, timestep, **kwargs).sample, reference) > 1e-3
    snn.save_pretrained(tmp_path)
    loaded = SpikingUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert loaded.unet.conv_act.spikes_per_step == 16
    back = loaded.to_qcfs()
    assert back.config.output_precision == 4 and back.sites()[OUTPUT_SITE].levels == 64
    with torch.no_grad():
        assert torch.equal(loaded(sample, timestep, **kwargs).sample, snn(sample, timestep, **kwargs).sample)
    with torch.no_grad(), OperationCounter(snn) as counter:  # up to 16 spikes per step at the output: counted
        snn(sample, timestep, **kwargs)
    assert counter.accounting.sites[OUTPUT_SITE].spikes > 0


def test_conditional_unet_takes_it_too():
    qnet = quantize(make_conditional(), levels=8, output_precision=2)
    assert qnet.sites()[OUTPUT_SITE].levels == 16
    assert convert(qnet, timesteps=8).unet.conv_act.spikes_per_step == 2


def test_signed_if_cannot_take_it():
    qnet = quantize(make_unet(TINY_CONFIGS["attention"]), levels=8, output_precision=2)
    with pytest.raises(ValueError, match=r"output_precision=2 .* neuron='if'"):
        convert(qnet, timesteps=8, neuron="signed_if")
    assert CalibrationConfig().output_precision == 1  # the default recipe leaves the output unit alone
    with pytest.raises(ValueError, match="output_precision=4 needs plain IF"):
        CalibrationConfig(neuron="signed_if", output_precision=4).validate()
    with pytest.raises(ValueError, match="output_precision"):
        quantize(make_unet(TINY_CONFIGS["attention"]), levels=8, output_precision=0)


def test_commands_take_and_check_it(tmp_path):
    options = {"output_precision": 2}
    assert calibrate_command.build_config(**_calibrate_defaults(), **options).output_precision == 2
    qcfs_dir = tmp_path / "qcfs"
    quantize(make_unet(TINY_CONFIGS["attention"], dtype=torch.float32), levels=4, output_precision=2).save_pretrained(
        qcfs_dir
    )
    runner = CliRunner()
    result = runner.invoke(
        convert_command.main, ["--model", str(qcfs_dir), "--output", str(tmp_path / "out"), "--output-precision", "3"]
    )
    assert result.exit_code == 2
    assert "output_precision=3 conflicts with the model's own output_precision=2" in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(convert_command.main, ["--model", str(qcfs_dir), "--output", str(tmp_path / "snn")])
    assert result.exit_code == 0, result.output
    assert "output unit at 2 x the levels" in result.output  # the model's own P, said in the settings line
    report = json.loads((tmp_path / "snn" / "conversion.json").read_text())
    assert report["settings"]["output_precision"] == 2
    result = runner.invoke(calibrate_command.main, ["--output", str(tmp_path / "cal"), "--output-precision", "0"])
    assert result.exit_code == 2 and "--output-precision" in result.output


def _calibrate_defaults() -> dict:
    """``sdm-calibrate``'s options at their defaults, as ``build_config`` takes them."""
    context = calibrate_command.main.make_context("sdm-calibrate", ["--output", "unused"])
    params = dict(context.params)
    for key in ("model", "output", "overwrite", "device", "checkpoint_every", "resume", "output_precision"):
        params.pop(key, None)
    return params


def test_onnx_graphs_carry_the_finer_output_unit(tmp_path):
    from spiking_diffusers.export import TOLERANCE, export_qcfs, export_step

    qnet = quantize(
        make_unet(TINY_CONFIGS["attention"], dtype=torch.float32), levels=4, num_samples=2, output_precision=4
    )
    assert export_qcfs(qnet, tmp_path / "qcfs.onnx").max_abs_error <= TOLERANCE
    check, _ = export_step(convert(qnet, timesteps=4), tmp_path / "step.onnx")
    assert check.passed and check.max_abs_error <= TOLERANCE
