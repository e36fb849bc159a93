"""The temporal-wise spiking mechanism (TSM): per-step factors on every neuron's input current."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import TINY_CONFIGS, make_inputs, make_unet
from spiking_diffusers import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate
from spiking_diffusers.calibration.data import NoisedBatches
from spiking_diffusers.calibration.distill import DistillSettings, distill


def run(model, unet, **extra):
    sample, timestep, kwargs = make_inputs(unet, 2)
    with torch.no_grad():
        return model(sample, timestep, **kwargs, **extra).sample


def randomise_factors(snn: SpikingUNet2DModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for neuron in snn.neurons().values():
        values = 0.5 + torch.rand(neuron.temporal_factors.shape, generator=generator, dtype=torch.float64)
        neuron.temporal_factors.data.copy_(values)


@pytest.mark.parametrize("execution", ["batched", "stepwise"])
def test_factors_of_one_change_nothing(execution):
    unet = make_unet(TINY_CONFIGS["attention"])
    qnet = quantize(unet, levels=3, per_channel=True)
    plain = convert(qnet, timesteps=3, execution=execution)
    with_tsm = convert(qnet, timesteps=3, execution=execution, tsm=True)
    assert all(n.temporal_factors.shape == (3,) for n in with_tsm.neurons().values())
    assert torch.equal(run(with_tsm, unet), run(plain, unet))


def test_factors_change_the_output_and_both_modes_agree():
    unet = make_unet(TINY_CONFIGS["attention"])
    snn = convert(quantize(unet, levels=4), timesteps=4, tsm=True)
    reference = run(snn, unet)
    randomise_factors(snn)
    batched = run(snn, unet)
    snn.set_execution("stepwise")
    assert not torch.allclose(batched, reference)
    assert torch.allclose(run(snn, unet), batched, atol=1e-10)


def test_factors_survive_save_and_load(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    snn = convert(quantize(unet, levels=2), timesteps=2, tsm=True)
    randomise_factors(snn)
    snn.save_pretrained(tmp_path)
    loaded = SpikingUNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.tsm
    for name, neuron in snn.neurons().items():
        assert torch.equal(loaded.neurons()[name].temporal_factors, neuron.temporal_factors)
    assert torch.equal(run(loaded, unet), run(snn, unet))


def test_a_simulation_length_other_than_the_factors_is_refused():
    unet = make_unet(TINY_CONFIGS["attention"])
    snn = convert(quantize(unet, levels=2), timesteps=2, tsm=True)
    with pytest.raises(ValueError, match="T = 2"):
        run(snn, unet, snn_timesteps=3)


def test_fine_tuning_moves_the_factors_alone_and_lowers_the_loss():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    snn = convert(quantize(unet, levels=2), timesteps=2, tsm=True)
    weights_before = {k: v.clone() for k, v in snn.state_dict().items() if not k.endswith("temporal_factors")}
    data = NoisedBatches(torch.rand(16, 1, 8, 8) * 2 - 1, DDPMScheduler(), torch.Generator().manual_seed(0))
    settings = DistillSettings(steps=30, batch_size=8, lr=1e-3, train="tsm", tsm_lr=5e-2)
    history = distill(snn, unet, data, settings, progress=False)
    assert sum(history.output_loss[-5:]) < sum(history.output_loss[:5])
    assert any(not torch.all(n.temporal_factors == 1) for n in snn.neurons().values())
    assert all(torch.equal(v, snn.state_dict()[k]) for k, v in weights_before.items())


def test_calibration_with_tsm_carries_the_factors_into_conversion(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    config = CalibrationConfig(
        timesteps=2,
        tsm=True,
        num_samples=8,
        sampler_steps=2,
        stats_batches=1,
        distill=DistillSettings(steps=2, batch_size=4),
        snn=DistillSettings(steps=4, batch_size=4, tsm_lr=5e-2),
    )
    qnet = calibrate(unet, dict(DDPMScheduler().config), config, progress=False).qnet
    assert qnet.config.tsm_steps == 2
    qnet.save_pretrained(tmp_path)
    loaded = QCFSUNet2DModel.from_pretrained(tmp_path)
    snn = convert(loaded, timesteps=2)
    assert snn.config.tsm
    assert any(not torch.all(n.temporal_factors == 1) for n in snn.neurons().values())
    with pytest.raises(ValueError, match="calibrated for T = 2"):
        convert(loaded, timesteps=4)
    assert not convert(loaded, timesteps=4, tsm=False).config.tsm


def test_a_tsm_spiking_model_maps_back_to_its_qcfs_network_for_evaluation():
    from spiking_diffusers.evaluation import prepare_variants

    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    snn = convert(quantize(unet, levels=2), timesteps=2, tsm=True)
    randomise_factors(snn)
    qnet = snn.to_qcfs()
    assert qnet.config.tsm_steps == 2
    assert torch.equal(run(convert(qnet, timesteps=2), unet), run(snn, unet))
    kinds = [variant.kind for variant in prepare_variants(snn, unet, timesteps=[2])]
    assert kinds == ["ann", "qcfs", "snn"]


def test_evaluating_a_tsm_model_at_another_T_is_a_clear_usage_error():
    from spiking_diffusers.evaluation import VariantError, prepare_variants

    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    snn = convert(quantize(unet, levels=2), timesteps=2, tsm=True)
    for model in (snn, snn.to_qcfs()):
        with pytest.raises(VariantError, match="--timesteps 2"):
            prepare_variants(model, unet, timesteps=[1, 2, 4])
