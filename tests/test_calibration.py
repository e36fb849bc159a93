"""Calibration: threshold initialisation, distillation, determinism, and the saved result."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import QCFSUNet2DModel, convert, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate, load_snn_weights_into_qcfs
from spiking_diffusers.calibration.data import NoisedBatches, sample_model_images
from spiking_diffusers.calibration.distill import DistillSettings, distill
from spiking_diffusers.converter.thresholds import mse_threshold, percentile_threshold

SCHEDULER_CONFIG = dict(DDPMScheduler(num_train_timesteps=1000).config)


def tiny_config(**overrides) -> CalibrationConfig:
    settings = dict(
        timesteps=2,
        num_samples=16,
        sampler_steps=2,
        stats_batches=1,
        distill=DistillSettings(steps=6, batch_size=4),
        snn=DistillSettings(steps=3, batch_size=4, lr=1e-4),
    )
    settings.update(overrides)
    return CalibrationConfig(**settings)


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
    (xa, ta), (xb, tb) = batches[0].sample(10), batches[1].sample(10)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
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
    for stage in ("before", "after"):
        assert set(site[stage]) == {"threshold", "threshold_mean", "clipped_fraction", "quantization_mse"}
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
