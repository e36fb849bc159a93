"""The output filter: a per-timestep linear filter on the noise prediction, fitted by least squares."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from conftest import TINY_CONFIGS, make_conditional, make_inputs, make_unet, relative_error
from spiking_diffusers import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate
from spiking_diffusers.calibration.data import CalibrationSet
from spiking_diffusers.calibration.distill import DistillSettings
from spiking_diffusers.calibration.output_filter import fit_indices, fit_output_filter
from spiking_diffusers.commands import convert as convert_command
from spiking_diffusers.energy.accounting import OperationCounter

SCHEDULER_CONFIG = dict(DDPMScheduler(num_train_timesteps=1000).config)


def _qnet(dtype=torch.float64) -> QCFSUNet2DModel:
    return quantize(make_unet(TINY_CONFIGS["attention"], dtype=dtype), levels=4, num_samples=2)


def _calibration_set(qnet: QCFSUNet2DModel, size: int = 64, seed: int = 0) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(8, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    return CalibrationSet.draw(x0, DDPMScheduler(num_train_timesteps=1000), size, generator)


def test_a_new_filter_is_the_identity_and_as_ann_runs_without_it():
    qnet = _qnet()
    sample, timestep, _ = make_inputs(qnet.unet)
    with torch.no_grad():
        before = qnet(sample, timestep).sample
        qnet.set_output_filter(5, groups=4)
        assert qnet.config.output_filter_size == 5 and qnet.config.output_filter_groups == 4
        assert torch.equal(qnet(sample, timestep).sample, before)
        qnet.output_filter.bias.fill_(1.0)
        assert torch.allclose(qnet(sample, timestep).sample, before + 1)
        with qnet.as_ann():
            ann = qnet(sample, timestep).sample
        with qnet.as_ann(), qnet.output_filter_disabled():
            assert torch.equal(qnet(sample, timestep).sample, ann)  # as_ann already leaves the filter out


def test_the_fit_recovers_a_known_linear_map_per_range():
    qnet = _qnet()
    qnet.set_output_filter(3, groups=2)
    cset = _calibration_set(qnet)
    with torch.no_grad():
        prediction = qnet(cset.x_t, cset.timesteps).sample
    late = (cset.timesteps >= 500).reshape(-1, 1, 1, 1)
    # Early range: 0.5 x prediction + 0.25; late range: 0.8 x prediction + 0.3 x the input (the skip it learns).
    cset.targets = torch.where(late, 0.8 * prediction + 0.3 * cset.x_t, 0.5 * prediction + 0.25)
    report = fit_output_filter(qnet, cset, batch_size=16)
    with torch.no_grad():
        assert relative_error(qnet(cset.x_t, cset.timesteps).sample, cset.targets) < 1e-4  # the ridge term
    centre = qnet.output_filter.weight[:, 0, :, 1, 1]
    assert centre.flatten().tolist() == pytest.approx([0.5, 0.0, 0.8, 0.3], abs=1e-4)
    assert qnet.output_filter.bias[:, 0].tolist() == pytest.approx([0.25, 0.0], abs=1e-4)
    assert [group["timesteps"] for group in report["groups"]] == [[0, 499], [500, 999]]
    assert sum(group["inputs"] for group in report["groups"]) == len(cset)
    assert all(group["relative_error_after"] < 1e-4 < group["relative_error_before"] for group in report["groups"])


def test_a_fit_on_part_of_the_set_takes_an_even_spread_of_the_schedule():
    qnet = _qnet()
    qnet.set_output_filter(3, groups=2)
    cset = _calibration_set(qnet)
    assert torch.equal(fit_indices(cset, None), torch.arange(len(cset)))
    assert torch.equal(fit_indices(cset, 1000), torch.arange(len(cset)))
    chosen = fit_indices(cset, 16)
    assert len(chosen.unique()) == 16
    spread = cset.timesteps[chosen]
    assert torch.equal(spread, spread.sort().values)  # in schedule order, from the first to the last
    assert spread[0] == cset.timesteps.min() and spread[-1] == cset.timesteps.max()
    assert int((spread >= 500).sum()) == 8  # the set is stratified: half of it in each half of the schedule
    with pytest.raises(ValueError, match="max_inputs"):
        fit_indices(cset, 0)
    with torch.no_grad():
        prediction = qnet(cset.x_t, cset.timesteps).sample
    cset.targets = 0.5 * prediction - 0.2 * cset.x_t
    report = fit_output_filter(qnet, cset, batch_size=5, max_inputs=16)
    assert [group["inputs"] for group in report["groups"]] == [8, 8]
    with torch.no_grad():  # an exact map: a quarter of the set recovers it everywhere
        assert relative_error(qnet(cset.x_t, cset.timesteps).sample, cset.targets) < 1e-4


def test_calibration_fits_it_and_the_spiking_model_keeps_it(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    settings = dict(
        timesteps=2,
        num_samples=8,
        sampler_steps=2,
        stats_batches=1,
        set_size=64,
        sweep_images=2,
        cache_dir=str(tmp_path),
    )
    steps = dict(distill=DistillSettings(steps=2, batch_size=4), snn=DistillSettings(steps=1, batch_size=4))
    result = calibrate(unet, SCHEDULER_CONFIG, CalibrationConfig(**settings, **steps, output_filter=3), progress=False)
    qnet, groups = result.qnet, result.report["output_filter"]["groups"]
    assert qnet.config.output_filter_size == 3 and len(groups) == 20 and result.report["settings"]["output_filter"] == 3
    for group in groups:  # least squares over a family that holds the identity: no range gets worse
        assert group["relative_error_after"] <= group["relative_error_before"] * 1.001 + 1e-6
    assert (
        "filter" in result.report["phase_wall_time_s"] and result.report["output_filter"]["fitted_on"] == "SNN at T = 2"
    )
    unfiltered = calibrate(
        unet, SCHEDULER_CONFIG, CalibrationConfig(**settings, **steps, output_filter=0), progress=False
    )
    assert unfiltered.qnet.output_filter is None and unfiltered.report["output_filter"] is None
    states = unfiltered.qnet.unet.state_dict(), qnet.unet.state_dict()  # the filter comes after, changing nothing else
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])

    snn = convert(qnet, timesteps=2)
    sample, timestep, _ = make_inputs(qnet.unet)
    sample = sample.float()
    with torch.no_grad():
        batched = snn(sample, timestep).sample
        with snn.output_filter_disabled():
            raw = snn(sample, timestep).sample
        assert torch.allclose(batched, snn.output_filter(raw, sample, timestep))
        snn.set_execution("stepwise")
        assert torch.allclose(snn(sample, timestep).sample, batched, atol=1e-5)
    snn.save_pretrained(tmp_path / "snn")
    loaded = SpikingUNet2DModel.from_pretrained(tmp_path / "snn")
    assert torch.equal(loaded.output_filter.weight, qnet.output_filter.weight)
    back = loaded.to_qcfs()
    with torch.no_grad():
        assert torch.equal(back(sample, timestep).sample, qnet(sample, timestep).sample)


def test_models_saved_before_it_existed_load_without_a_filter(tmp_path):
    qnet = _qnet()
    qnet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["output_filter_size"] == 0
    del config["output_filter_size"], config["output_filter_groups"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = QCFSUNet2DModel.from_pretrained(tmp_path)
    assert loaded.output_filter is None and convert(loaded, timesteps=2).output_filter is None


def test_bad_settings_are_named():
    qnet = _qnet()
    for size in (2, 17, -1):
        with pytest.raises(ValueError, match="output_filter"):
            qnet.set_output_filter(size)
    with pytest.raises(ValueError, match="output_filter_groups"):
        qnet.set_output_filter(3, groups=0)
    with pytest.raises(ValueError, match="output_filter must be 0"):
        CalibrationConfig(output_filter=4).validate()
    with pytest.raises(ValueError, match="no output filter"):
        fit_output_filter(qnet, _calibration_set(qnet))


def test_energy_counts_it_as_real_valued_work():
    qnet = _qnet()
    qnet.set_output_filter(5)
    snn = convert(qnet, timesteps=2)
    sample, timestep, _ = make_inputs(qnet.unet)
    with torch.no_grad(), OperationCounter(snn) as counter:
        snn(sample, timestep)
    layer = counter.accounting.layers[("output_filter", "filter matmul")]
    batch, channels, height, width = sample.shape
    assert not layer.spike_driven and layer.acs == 0
    assert layer.macs == batch * channels * height * width * (2 * channels * 5 * 5)  # once per forward, not per step


def test_conditional_unet_and_onnx_graphs(tmp_path):
    from spiking_diffusers.export import TOLERANCE, export_qcfs, export_step

    conditional = quantize(make_conditional(), levels=4, num_samples=2)
    conditional.set_output_filter(3, groups=4)
    conditional.output_filter.bias.fill_(0.5)
    spiking = convert(conditional, timesteps=2)
    assert spiking.config.output_filter_size == 3 and torch.equal(
        spiking.output_filter.bias, conditional.output_filter.bias
    )

    qnet = _qnet(torch.float32)
    qnet.set_output_filter(3, groups=4)
    torch.manual_seed(0)
    qnet.output_filter.weight.add_(0.05 * torch.randn_like(qnet.output_filter.weight))
    qnet.output_filter.bias.normal_()
    assert export_qcfs(qnet, tmp_path / "qcfs.onnx").max_abs_error <= TOLERANCE
    check, _ = export_step(convert(qnet, timesteps=2), tmp_path / "step.onnx")
    assert check.passed and check.max_abs_error <= TOLERANCE


def test_sdm_convert_checks_the_option(tmp_path):
    qnet = _qnet(torch.float32)
    qnet.set_output_filter(3)
    qnet.save_pretrained(tmp_path / "qcfs")
    runner = CliRunner()
    result = runner.invoke(
        convert_command.main,
        ["--model", str(tmp_path / "qcfs"), "--output", str(tmp_path / "out"), "--output-filter", "5"],
    )
    assert result.exit_code == 2 and "output filter size 3" in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(convert_command.main, ["--model", str(tmp_path / "qcfs"), "--output", str(tmp_path / "snn")])
    assert result.exit_code == 0, result.output
    assert "3 x 3 output filter" in result.output
    assert json.loads((tmp_path / "snn" / "conversion.json").read_text())["settings"]["output_filter_size"] == 3
    ann_dir = tmp_path / "ann"
    make_unet(TINY_CONFIGS["attention"], dtype=torch.float32).save_pretrained(ann_dir)
    for options, message in (
        (["--output-filter", "4"], "0 (none) or odd"),
        (["--no-calibrate", "--output-filter", "3"], "fitted by calibration"),
    ):
        result = runner.invoke(
            convert_command.main, ["--model", str(ann_dir), "--output", str(tmp_path / "x"), *options]
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "x").exists()
