"""Calibration: threshold initialisation, distillation, determinism, the saved result, the calibration set
with its teacher outputs computed once, its stratified timesteps, the cost estimate and the time budget."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import QCFSUNet2DModel, convert, distributed, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate, load_snn_weights_into_qcfs
from spiking_diffusers.calibration.checkpoint import CalibrationCheckpoints
from spiking_diffusers.calibration.cost import CalibrationProgress, Phase, UnitCosts, fit_to_budget, plan_phases
from spiking_diffusers.calibration.data import CalibrationSet, NoisedBatches, sample_model_images, stratified_timesteps
from spiking_diffusers.calibration.distill import DistillSettings, distill
from spiking_diffusers.calibration.report import PLOT_FILE, write_calibration_report
from spiking_diffusers.commands import calibrate as calibrate_command
from spiking_diffusers.converter.thresholds import mse_threshold, percentile_threshold

calibrate_module = importlib.import_module("spiking_diffusers.calibration.calibrate")  # the package exports
# a function of the same name
SCHEDULER_CONFIG = dict(DDPMScheduler(num_train_timesteps=1000).config)


def tiny_config(**overrides) -> CalibrationConfig:
    settings = dict(
        timesteps=2,
        num_samples=16,
        sampler_steps=2,
        stats_batches=1,
        set_size=64,
        sweep_images=2,
        distill=DistillSettings(steps=6, batch_size=4),
        snn=DistillSettings(steps=3, batch_size=4, lr=1e-4),
    )
    settings.update(overrides)
    return CalibrationConfig(**settings)


FIXED_COSTS = UnitCosts(
    teacher_s=0.01, student_step_s=0.5, snn_step_s=1.0, channels=100, threads=1, device="cpu"
)  # a slow machine, made up: budgets and estimates below do not depend on this one's speed


def test_percentile_threshold_matches_the_known_quantile():
    values = torch.arange(0, 1001, dtype=torch.float32).reshape(1, -1)  # 0..1000
    assert percentile_threshold(values, 99.9).item() == pytest.approx(999.0)
    per_channel = percentile_threshold(torch.stack([values[0], 2 * values[0]]), 50.0, per_channel=True)
    assert per_channel.tolist() == pytest.approx([500.0, 1000.0])


def test_mse_threshold_finds_the_lambda_whose_levels_the_data_sits_on():
    # ReLU inputs exactly on the 4-level grid of lambda = 2 (channel 0) and lambda = 0.5 (channel 1)
    levels = torch.arange(0, 5, dtype=torch.float32) / 4
    channel0 = (levels * 2.0).repeat(50)
    channel1 = (levels * 0.5).repeat(50)
    values = torch.stack([channel0, channel1])
    lam = mse_threshold(values, torch.nn.ReLU(), levels=4, phi=0.5, per_channel=True)
    assert lam.tolist() == pytest.approx([2.0, 0.5], rel=1e-5)
    assert mse_threshold(channel0.reshape(1, -1), torch.nn.ReLU(), levels=4).item() == pytest.approx(2.0, rel=1e-5)


def test_noised_batches_are_stratified_and_deterministic():
    x0 = torch.zeros(8, 1, 4, 4)
    batches = [NoisedBatches(x0, DDPMScheduler(), torch.Generator().manual_seed(3)) for _ in range(2)]
    (xa, ta, ka), (xb, tb, _) = batches[0].sample(10), batches[1].sample(10)
    assert torch.equal(xa, xb) and torch.equal(ta, tb) and ka == {}
    assert sorted((ta // 100).tolist()) == list(range(10))  # one timestep in each tenth of the schedule


def test_model_samples_are_cached_and_reused(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    first = sample_model_images(unet, SCHEDULER_CONFIG, 3, sampler_steps=2, cache_dir=tmp_path, progress=False)
    cached = list((tmp_path / "calibration").glob("*.safetensors"))
    assert len(cached) == 1 and first.shape == (3, 1, 8, 8)
    # image i is the model's own DDIM sample from generator seed * 1_000_003 + i, mapped from [0, 1] to [-1, 1]
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(generator=[torch.Generator().manual_seed(2)], num_inference_steps=2, output_type="np").images
    torch.testing.assert_close(first[2], torch.from_numpy(image[0]).permute(2, 0, 1) * 2 - 1)
    assert first.min() < -0.5 and first.max() > 0.5
    again = sample_model_images(unet, SCHEDULER_CONFIG, 3, sampler_steps=2, cache_dir=tmp_path, progress=False)
    assert torch.equal(first, again)
    # Another noise schedule samples other images from the same weights: never the cached ones.
    cosine = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").config)
    other = sample_model_images(unet, cosine, 3, sampler_steps=2, cache_dir=tmp_path, progress=False)
    assert not torch.equal(other, first)
    fresh = sample_model_images(unet, cosine, 3, sampler_steps=2, cache_dir=tmp_path / "fresh", progress=False)
    assert torch.equal(other, fresh)


def test_distillation_reduces_the_output_error():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=2)
    data = NoisedBatches(torch.rand(16, 1, 8, 8) * 2 - 1, DDPMScheduler(), torch.Generator().manual_seed(0))
    history = distill(qnet, unet, data, DistillSettings(steps=40, batch_size=8, lr=3e-3), progress=False)
    first, last = sum(history.output_loss[:5]) / 5, sum(history.output_loss[-5:]) / 5
    assert last < 0.7 * first


def test_snn_fine_tuning_reduces_the_spiking_error_and_maps_back():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=2)
    snn = convert(qnet, timesteps=2)
    data = NoisedBatches(torch.rand(16, 1, 8, 8) * 2 - 1, DDPMScheduler(), torch.Generator().manual_seed(0))
    history = distill(snn, unet, data, DistillSettings(steps=40, batch_size=8, lr=3e-3), progress=False)
    assert sum(history.output_loss[-5:]) < 0.8 * sum(history.output_loss[:5])
    load_snn_weights_into_qcfs(snn, qnet)
    sample, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 600])
    with torch.no_grad():
        assert torch.equal(convert(qnet, timesteps=2)(sample, t).sample, snn(sample, t).sample)


def test_same_seed_gives_identical_calibrated_weights(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    results = [
        calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path)), progress=False) for _ in range(2)
    ]
    states = [r.qnet.state_dict() for r in results]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path), seed=1), progress=False)
    assert not all(torch.equal(states[0][k], v) for k, v in other.qnet.state_dict().items())


def test_report_has_every_field(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    report = calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path)), progress=False).report
    assert set(report) >= {"settings", "sites", "loss_curves", "wall_time_s", "calibration_samples"}
    assert set(report["settings"]) >= {"timesteps", "levels", "per_channel", "threshold_init", "distill", "snn", "seed"}
    site = report["sites"]["down_blocks.0.resnets.0.temb_act"]
    assert report["settings"]["offsets"] is True  # the default, resolved for a UNet2DModel, is what is recorded
    for stage in ("before", "after"):
        fields = {"threshold", "threshold_mean", "clipped_fraction", "quantization_mse", "shift", "offset"}
        assert set(site[stage]) == fields
    assert len(report["loss_curves"]["distill"]) == 6 and len(report["loss_curves"]["snn"]) == 3
    json.dumps(report)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="at least 1"):
        tiny_config(timesteps=0).validate()


def test_image_folder_calibration(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(12, 12) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    result = calibrate(unet, SCHEDULER_CONFIG, tiny_config(image_dir=str(tmp_path)), progress=False)
    assert result.report["calibration_samples"]["count"] == 3
    assert isinstance(result.qnet, QCFSUNet2DModel)


def test_teacher_outputs_computed_once_train_like_the_teacher_run_at_every_step(single_thread):
    """The labelled set's targets are the teacher's outputs on the same inputs, so training on them is training
    against the teacher run at every step, to float rounding: the cached outputs come from batches of 64 in set
    order, the recomputed ones from each training batch, and a sample's output depends on its batch's other
    samples in the last bits (about 1e-6 relative in float32). In float32 the QCFS floor turns such differences
    into different training runs within a few steps, as another thread count does; in float64 (here) they stay
    at rounding level. The same seed gives the same result on either path."""
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float64)
    x0 = torch.rand(8, 1, 8, 8, dtype=torch.float64) * 2 - 1
    sets = [CalibrationSet.draw(x0, DDPMScheduler(), 96, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(sets[0].x_t, sets[1].x_t) and torch.equal(sets[0].timesteps, sets[1].timesteps)
    sets[0].label(unet)
    assert sets[1].targets is None  # unlabelled: distill runs the teacher on every batch
    settings = DistillSettings(steps=12, batch_size=8, lr=3e-3)
    students = [quantize(unet, levels=2) for _ in range(2)]
    calls = []
    handle = unet.register_forward_hook(lambda *args: calls.append(1))
    histories = [
        distill(student, unet, data, settings, progress=False) for student, data in zip(students, sets, strict=True)
    ]
    handle.remove()
    assert len(calls) == 12  # the teacher ran only for the unlabelled set, once per step
    torch.testing.assert_close(histories[0].output_loss, histories[1].output_loss, rtol=1e-9, atol=0)
    a, b = (student.state_dict() for student in students)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)
    again = quantize(unet, levels=2)
    sets[0].generator.manual_seed(5)
    CalibrationSet.draw(x0, DDPMScheduler(), 96, sets[0].generator)  # the same generator state
    assert distill(again, unet, sets[0], settings, progress=False).output_loss == histories[0].output_loss


def test_calibration_timesteps_cover_the_schedule_one_per_slice():
    generator = torch.Generator().manual_seed(0)
    t = stratified_timesteps(1000, 1000, generator)
    assert sorted(t.tolist()) == list(range(1000))  # as many draws as timesteps: each exactly once
    t = stratified_timesteps(10, 1000, generator)
    assert sorted((t // 100).tolist()) == list(range(10))
    assert not torch.equal(t, t.sort().values)  # in random order: a training batch is not a slice of the schedule


def test_calibration_set_uses_every_image_and_is_deterministic():
    x0 = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    draws = [CalibrationSet.draw(x0, DDPMScheduler(), 10, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(draws[0].x_t, draws[1].x_t) and torch.equal(draws[0].timesteps, draws[1].timesteps)
    assert draws[0].nbytes == 10 * 4 * 4 + 10 * 8
    batch = [d.sample(6) for d in draws]
    assert torch.equal(batch[0][0], batch[1][0]) and batch[0][2] is None and batch[0][3] == {}


def test_report_has_the_noise_prediction_sweep_before_and_after(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    report = calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path)), progress=False).report
    sweep = report["noise_prediction_sweep"]
    assert sweep["timesteps"] == [1, 10, 50, 100, 250, 500, 750, 999] and sweep["images"] == 2
    for stage in ("before", "after"):
        assert set(sweep[stage]) == {"qcfs", "snn"}
        assert all(len(errors) == 8 and all(e > 0 for e in errors) for errors in sweep[stage].values())
    assert sweep["after"]["snn"] != sweep["before"]["snn"]
    assert report["calibration_set"]["size"] == 64 and report["calibration_set"]["labelled_once"]
    assert set(report["phase_wall_time_s"]) == {"samples", "statistics", "labels", "distill", "snn", "filter", "sweep"}
    write_calibration_report(report, tmp_path)
    from PIL import Image

    with Image.open(tmp_path / PLOT_FILE) as plot:  # three panels: thresholds, loss curves, the sweep
        assert plot.height > plot.width * 0.9
    no_sweep = calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path), sweep_images=0), progress=False)
    assert no_sweep.report["noise_prediction_sweep"] == {}


def test_budget_scales_the_steps_first_then_the_data():
    config = CalibrationConfig()
    full = sum(p.seconds for p in plan_phases(config, FIXED_COSTS, samples_cached=False))
    fit = fit_to_budget(dataclasses_replace(config, budget_minutes=full / 60 + 1), FIXED_COSTS, False)
    assert fit.changes == {} and fit.config.distill.steps == config.distill.steps
    fit = fit_to_budget(dataclasses_replace(config, budget_minutes=full / 60 * 0.75), FIXED_COSTS, False)
    assert set(fit.changes) == {"distill_steps", "snn_steps"} and fit.fits  # data within a third of the budget
    scaled = fit.changes["distill_steps"][1]
    assert 0 < scaled < config.distill.steps and fit.changes["snn_steps"][1] < config.snn.steps
    assert fit.config.num_samples == config.num_samples and fit.estimate_s <= full * 0.75 + 1e-6
    assert f"distillation {config.distill.steps} -> {scaled} steps" in fit.message(full / 60 * 0.75)
    tight = fit_to_budget(dataclasses_replace(config, budget_minutes=0.5), FIXED_COSTS, False)
    assert {"num_samples", "set_size", "distill_steps"} <= set(tight.changes)
    cached = fit_to_budget(dataclasses_replace(config, budget_minutes=0.5), FIXED_COSTS, True)
    assert "num_samples" not in cached.changes  # images already in the cache cost nothing: kept
    floor = fit_to_budget(dataclasses_replace(config, budget_minutes=1e-6), FIXED_COSTS, False)
    assert not floor.fits and floor.config.distill.steps == 1 and "does not fit" in floor.message(1e-6)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_budget_run_is_recorded_in_the_report_and_resumes_with_its_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_module, "measure_unit_costs", lambda teacher, config: FIXED_COSTS)
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    config = tiny_config(cache_dir=str(tmp_path), distill=DistillSettings(steps=200, batch_size=4))
    full = sum(p.seconds for p in plan_phases(config, FIXED_COSTS, samples_cached=False))
    config.budget_minutes = full / 60 / 3  # above the floor of one SNN step
    result = calibrate(unet, SCHEDULER_CONFIG, config, progress=False)
    budget = result.report["budget"]
    before, after = budget["changes"]["distill_steps"]
    assert before == 200 and 0 < after < 200 and budget["fits"] and budget["minutes"] == config.budget_minutes
    assert len(result.report["loss_curves"]["distill"]) == after
    assert result.report["settings"]["distill"]["steps"] == after
    assert result.report["requested_settings"]["distill"]["steps"] == 200
    assert result.report["estimated_seconds"]["total"] <= config.budget_minutes * 60
    assert config.distill.steps == 200  # the caller's config is left as it was

    # Interrupted and resumed on a machine that now times twice as fast: the run keeps the sizes it started with.
    # (The images are in the cache now, so the budget leaves more steps than the first time.)
    reference = calibrate(unet, SCHEDULER_CONFIG, config, progress=False)
    assert reference.report["budget"]["changes"]["distill_steps"][1] > after
    directory = tmp_path / "checkpoint"
    original, calls = CalibrationSet.sample, []

    def interrupting(self, batch_size):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, batch_size)

    with monkeypatch.context() as patch:
        patch.setattr(CalibrationSet, "sample", interrupting)
        with pytest.raises(KeyboardInterrupt):
            calibrate(unet, SCHEDULER_CONFIG, config, False, CalibrationCheckpoints(directory, every=2))
    faster = UnitCosts(0.005, 0.25, 0.5, 100, 1, "cpu")
    monkeypatch.setattr(calibrate_module, "measure_unit_costs", lambda teacher, config: faster)
    resumed = calibrate(unet, SCHEDULER_CONFIG, config, False, CalibrationCheckpoints(directory, every=2, resume=True))
    assert resumed.report["budget"]["changes"] == reference.report["budget"]["changes"]
    assert resumed.report["loss_curves"] == reference.report["loss_curves"]
    a, b = resumed.qnet.state_dict(), reference.qnet.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_progress_shows_the_estimate_and_one_bar_for_the_whole_run(tmp_path, capsys):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    quiet = calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path)), progress=False)
    shown = calibrate(unet, SCHEDULER_CONFIG, tiny_config(cache_dir=str(tmp_path)), progress=True)
    err = capsys.readouterr().err
    assert "Calibration estimate:" in err and "QCFS distillation 6 x" in err and "calibration: 100%" in err
    assert "distill QCFS" not in err  # no bar per phase: the one bar names the phase
    assert set(shown.report["estimated_seconds"]["phases"]) == {
        "samples",
        "statistics",
        "labels",
        "distill",
        "snn",
        "filter",
        "sweep",
    }
    a, b = quiet.qnet.state_dict(), shown.qnet.state_dict()  # timing the machine changes nothing
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("processes", [1, 2])
def test_progress_counts_every_processs_share_of_the_data_phases(monkeypatch, processes):
    """Data-parallel, each process labels its share: the main one's count stands for all of them."""
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    bar = CalibrationProgress([Phase("labels", 256, 0.01), Phase("distill", 10, 1.0)], enabled=True)
    count = bar.counter("labels")
    count(64)
    assert bar.bar.n == pytest.approx(64 * processes * 0.01)
    assert bar.bar.postfix.endswith(f"{64 * processes}/256")
    for _ in range(4):  # never past the phase's own share
        count(64)
    assert bar.bar.n == pytest.approx(256 * 0.01) and bar.bar.postfix.endswith("256/256")
    bar.close()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_budget_option_refuses_values_that_are_not_positive_and_finite(tmp_path, value):
    args = ["--output", str(tmp_path / "out"), "--calibration-budget", value]
    result = CliRunner().invoke(calibrate_command.main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--calibration-budget" in errors[0], result.output
    with pytest.raises(ValueError, match="budget_minutes"):
        tiny_config(budget_minutes=float(value)).validate()
