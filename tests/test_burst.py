"""Multi-threshold (burst) neurons: up to B spikes per step, B x T levels in T steps."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, make_inputs, make_unet, relative_error
from spiking_diffusers import SpikingUNet2DModel, convert, quantize
from spiking_diffusers.converter.encoders import signed_qcfs
from spiking_diffusers.converter.neurons import IFNeuron, TernaryIFEncoder
from spiking_diffusers.converter.qcfs import qcfs
from spiking_diffusers.energy.accounting import OperationCounter


@pytest.mark.parametrize("phi", [0.0, 0.5])
@pytest.mark.parametrize(("burst", "steps"), [(2, 3), (4, 4), (3, 1)])
def test_constant_input_reproduces_qcfs_with_burst_times_t_levels(phi, burst, steps):
    z = torch.linspace(-0.5, 2.5, 301, dtype=torch.float64).reshape(1, -1)
    neuron = IFNeuron(301, per_channel=True, phi=phi, burst=burst).double()
    with torch.no_grad():
        neuron.threshold.copy_(torch.linspace(0.5, 2.0, 301, dtype=torch.float64))
        neuron.begin(steps, "batched")
        out = neuron(z.repeat(steps, 1)).reshape(steps, -1).mean(0)
        expected = qcfs(z, neuron.threshold, levels=burst * steps, phi=phi).reshape(-1)
    assert torch.allclose(out, expected, atol=1e-12)
    # ... and a plain IF neuron at the same T cannot: it has only T levels
    plain = IFNeuron(301, per_channel=True, phi=phi).double()
    with torch.no_grad():
        plain.threshold.copy_(neuron.threshold)
        plain.begin(steps, "batched")
        assert not torch.allclose(plain(z.repeat(steps, 1)).reshape(steps, -1).mean(0), expected, atol=1e-6)


def test_burst_needs_plain_if_and_a_whole_count():
    with pytest.raises(ValueError, match="burst"):
        IFNeuron(4, neuron="signed_if", burst=2)
    with pytest.raises(ValueError, match="burst"):
        IFNeuron(4, burst=0)


def test_burst_network_follows_its_finer_qcfs_net_and_saves(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"])
    sample, timestep, kwargs = make_inputs(unet)
    qnet = quantize(unet, levels=16)
    with torch.no_grad():
        reference = qnet(sample, timestep, **kwargs).sample
        burst = convert(qnet, timesteps=4, burst=4)
        plain = convert(qnet, timesteps=4)
        error_burst = relative_error(burst(sample, timestep, **kwargs).sample, reference)
        error_plain = relative_error(plain(sample, timestep, **kwargs).sample, reference)
    assert error_burst < 0.5 * error_plain
    burst.save_pretrained(tmp_path)
    loaded = SpikingUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert loaded.config.burst == 4
    stepwise = convert(qnet, timesteps=4, burst=4, execution="stepwise")
    unit = convert(qnet, timesteps=4, burst=4, threshold_form="unit")
    with torch.no_grad():
        out = burst(sample, timestep, **kwargs).sample
        assert torch.equal(loaded(sample, timestep, **kwargs).sample, out)
        assert torch.allclose(stepwise(sample, timestep, **kwargs).sample, out, atol=1e-9)
        assert torch.allclose(unit(sample, timestep, **kwargs).sample, out, atol=1e-9)


def test_each_burst_spike_is_counted():
    """A neuron that sends k spikes in one step costs k accumulates per synapse, not one."""
    neuron = IFNeuron(1, burst=4).double()
    layer = torch.nn.Linear(1, 3, bias=False).double()
    model = torch.nn.Sequential(neuron, layer)
    with torch.no_grad():
        neuron.threshold.fill_(1.0)  # theta = 1/4: an input of 0.8 fires floor((0.8 + 0.125) / 0.25) = 3 spikes
        neuron.begin(1, "batched")
        with OperationCounter(model) as counter:
            model(torch.tensor([[0.8]], dtype=torch.float64))
    assert counter.accounting.acs == 3 * 3
    assert counter.accounting.sites["0"].spikes == 3


@pytest.mark.parametrize("phi", [0.0, 0.5])
@pytest.mark.parametrize(("burst", "steps"), [(2, 2), (4, 1), (3, 3)])
def test_burst_encoder_reproduces_signed_qcfs_with_burst_times_t_levels(phi, burst, steps):
    encoder = TernaryIFEncoder(1, phi=phi, burst=burst).double()
    encoder.threshold.data.fill_(1.5)
    z = torch.linspace(-3.0, 3.0, 2000, dtype=torch.float64).reshape(-1, 1)  # an even count keeps 0 off the grid
    with torch.no_grad():
        encoder.begin(steps, "batched")
        out = encoder(z.repeat(steps, 1)).reshape(steps, -1).mean(0)
    expected = signed_qcfs(z, torch.tensor([1.5], dtype=torch.float64), burst * steps, phi).reshape(-1)
    assert torch.allclose(out, expected, atol=1e-12)


def test_residual_spikes_network_with_burst_encoders_follows_its_finer_qcfs_net():
    unet = make_unet(TINY_CONFIGS["attention"])
    sample, timestep, kwargs = make_inputs(unet)
    qnet = quantize(unet, levels=16, residual_spikes=True)
    with torch.no_grad():
        reference = qnet(sample, timestep, **kwargs).sample
        burst = convert(qnet, timesteps=4, burst=4)
        plain = convert(qnet, timesteps=4)
        assert all(m.spikes_per_step == 4 for m in burst.modules() if isinstance(m, TernaryIFEncoder))
        error_burst = relative_error(burst(sample, timestep, **kwargs).sample, reference)
        error_plain = relative_error(plain(sample, timestep, **kwargs).sample, reference)
        unit = convert(qnet, timesteps=4, burst=4, threshold_form="unit")
        assert torch.allclose(
            unit(sample, timestep, **kwargs).sample, burst(sample, timestep, **kwargs).sample, atol=1e-9
        )
    assert error_burst < 0.5 * error_plain


def test_calibration_for_burst_neurons_records_b_and_conversion_uses_it(tmp_path):
    from spiking_diffusers.calibration import calibrate
    from spiking_diffusers.converter import QCFSUNet2DModel
    from test_calibration import SCHEDULER_CONFIG, tiny_config

    with pytest.raises(ValueError, match="levels = burst x T = 4"):
        tiny_config(burst=2, levels=3).validate()
    with pytest.raises(ValueError, match="plain IF"):
        tiny_config(burst=2, neuron="signed_if").validate()
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = calibrate(unet, SCHEDULER_CONFIG, tiny_config(burst=2, cache_dir=str(tmp_path)), progress=False).qnet
    assert (qnet.config.levels, qnet.config.burst) == (4, 2)  # L = B x T at T = 2
    qnet.save_pretrained(tmp_path / "qcfs")
    loaded = QCFSUNet2DModel.from_pretrained(tmp_path / "qcfs")
    snn = convert(loaded, spike_steps=2)
    assert snn.config.burst == 2 and snn.to_qcfs().config.burst == 2
    assert {m.spikes_per_step for m in snn.modules() if isinstance(m, IFNeuron)} == {2}
    assert convert(loaded, spike_steps=2, burst=1).config.burst == 1  # an explicit B wins
