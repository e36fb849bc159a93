"""Delta spikes: a weight layer receives the change of its input spikes from the previous UNet evaluation and
keeps its input currents, so it pays ``|k_n - k_(n-1)|`` accumulates per synapse for the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler
from torch import nn

from conftest import TINY_CONFIGS, make_inputs, make_unet
from spiking_diffusers import SpikingDiffusionPipeline, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.commands.energy import main as energy_main
from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.converter.sites import site_unit, site_wiring
from spiking_diffusers.energy.accounting import OperationCounter
from spiking_diffusers.energy.measure import measure_energy
from spiking_diffusers.energy.report import format_summary
from spiking_diffusers.pipelines import make_scheduler

DIAGONAL = torch.eye(3).reshape(1, 1, 3, 3)


def test_a_layer_pays_for_the_change_of_its_input_spikes():
    """An IF neuron (threshold 1, v(0) = 1/2: a current of 1 fires at once) feeding a 3x3 convolution."""
    chain = nn.Sequential(IFNeuron(1), nn.Conv2d(1, 2, 3, padding=1)).eval()
    chain[0].begin(1, "batched")
    fewer = DIAGONAL.clone()
    fewer[..., 0, 0] = 0  # one corner stops firing
    with torch.no_grad(), OperationCounter(chain, delta_spikes=True) as counter:
        for x in (DIAGONAL, fewer, fewer, torch.ones(1, 1, 4, 4)):
            chain(x)
    layer = counter.accounting.layers[("1", "conv3x3")]
    # all 3 spikes (corners reach 4 outputs, the centre 9: 17 x 2 channels); the corner's -1 (4 x 2); the repeat
    # nothing; a new input shape counts in full (16 spikes reaching 4 x 4 + 8 x 6 + 4 x 9 = 100 outputs, x 2)
    assert layer.acs == 34 + 8 + 0 + 200 and layer.input_spikes == 3 + 1 + 0 + 16
    assert counter.accounting.sites["0"].spikes == 3 + 2 + 2 + 16  # what the neuron fired: unchanged


@pytest.fixture(scope="module")
def tiny():
    """A tiny attention UNet (float64), its QCFS network with residual spikes, and its burst SNN (B = 2, T = 2)."""
    unet = make_unet(TINY_CONFIGS["attention"])
    qnet = quantize(unet, levels=4, num_samples=2, residual_spikes=True)
    return unet, qnet


def counts(snn: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]], delta: bool) -> list[tuple[int, int]]:
    """(ACs, MACs) of each evaluation of ``snn`` on ``inputs``, in one counted run."""
    per_call, seen = [], (0, 0)
    with torch.no_grad(), OperationCounter(snn, delta_spikes=delta) as counter:
        for sample, timestep in inputs:
            snn(sample, timestep)
            total = (counter.accounting.acs, counter.accounting.macs)
            per_call.append((total[0] - seen[0], total[1] - seen[1]))
            seen = total
    return per_call


def test_a_repeated_evaluation_sends_no_spikes_and_both_executions_agree(tiny):
    unet, qnet = tiny
    sample, timestep, _ = make_inputs(unet)
    inputs = [(sample, timestep), (sample, timestep), (0.9 * sample, timestep - 4)]
    runs = {}
    for execution in ("batched", "stepwise"):
        snn = convert(qnet, spike_steps=2, burst=2, execution=execution)
        every, delta = counts(snn, inputs, delta=False), counts(snn, inputs, delta=True)
        assert delta[0] == every[0]  # the first evaluation sends every spike
        assert delta[1] == (0, every[1][1])  # the same input again: no spikes, the real-valued work stays
        assert 0 < delta[2][0] < every[2][0] and delta[2][1] == every[2][1]
        runs[execution] = [acs for acs, _ in delta]
    assert runs["batched"] == runs["stepwise"]  # the same spikes, whether the T steps run folded or one by one


def test_kept_currents_plus_the_change_give_the_layer_output(tiny):
    """The exactness claim on real spikes: ``W k_n = W k_(n-1) + W (k_n - k_(n-1))`` for each convolution
    fed by an activation site, with the spike maps of two consecutive evaluations of the SNN."""
    unet, qnet = tiny
    snn = convert(qnet, spike_steps=2, burst=2)
    spikes: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, (parent, spec) in site_wiring(snn.unet).items():
        neuron, consumer = site_unit(parent, spec), getattr(parent, spec.consumer or "", None)
        if isinstance(neuron, IFNeuron) and isinstance(consumer, nn.Conv2d) and not spec.resample:
            hooks.append(neuron.register_forward_hook(lambda m, a, out, n=name: spikes.setdefault(n, []).append(out)))
    sample, timestep, _ = make_inputs(unet)
    with torch.no_grad():
        snn(sample, timestep)
        snn(0.9 * sample, timestep - 4)
    for hook in hooks:
        hook.remove()
    assert len(spikes) >= 4
    wiring = site_wiring(snn.unet)
    for name, (before, after) in spikes.items():
        parent, spec = wiring[name]
        conv = getattr(parent, spec.consumer)
        assert not torch.equal(before, after)
        rebuilt = conv(before) + conv._conv_forward(after - before, conv.weight, None)
        torch.testing.assert_close(rebuilt, conv(after), rtol=1e-10, atol=1e-10)


def test_a_sampling_run_costs_fewer_accumulates_and_samples_the_same(tiny):
    unet, qnet = tiny
    snn = convert(qnet, spike_steps=2, burst=2, delta_spikes=True)
    scheduler = make_scheduler("ddim", dict(DDPMScheduler().config))
    every = measure_energy(snn, unet, scheduler, 5, num_images=1, delta_spikes=False)
    delta = measure_energy(snn, unet, scheduler, 5, num_images=1)  # the model's own setting: on
    assert delta.delta_spikes and not every.delta_spikes
    assert delta.snn_macs == every.snn_macs and 0 < delta.snn_acs < every.snn_acs
    assert delta.energy_ratio < every.energy_ratio
    assert "delta spikes" in format_summary(delta) and "every spike sent as fired" in format_summary(every)
    assert delta.totals()["delta_spikes"] is True

    images = []
    for flag in (True, False):
        snn.set_delta_spikes(flag)
        pipe = SpikingDiffusionPipeline(unet=snn, scheduler=make_scheduler("ddim", dict(DDPMScheduler().config)))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="pt")
        images.append(out.images)
    assert torch.equal(*images)


def test_the_setting_is_saved_and_older_models_load_without_it(tiny, tmp_path):
    _, qnet = tiny
    snn = convert(qnet, spike_steps=2, delta_spikes=True)
    snn.save_pretrained(tmp_path / "on")
    assert SpikingUNet2DModel.from_pretrained(tmp_path / "on").config.delta_spikes is True
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    del config["delta_spikes"]  # a model saved before the option existed
    (tmp_path / "on" / "config.json").write_text(json.dumps(config))
    assert SpikingUNet2DModel.from_pretrained(tmp_path / "on").config.delta_spikes is False
    with pytest.raises(ValueError, match="delta_spikes must be True or False, got 'yes'"):
        convert(qnet, spike_steps=2, delta_spikes="yes")
    with pytest.raises(ValueError, match="delta_spikes must be True or False"):
        snn.set_delta_spikes(1)


def test_sdm_energy_counts_delta_spikes_unless_told_not_to(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    unet.save_pretrained(tmp_path / "ann")
    args = ["--model", tmp_path / "ann", "--steps", 3, "--num-images", 1, "-T", 2, "--no-calibrate"]
    reports = {}
    for flag in ("", "--no-delta-spikes"):  # an ANN is measured as sdm-convert makes it: delta spikes on
        given = [flag] if flag else []
        out = tmp_path / (flag or "default")
        result = CliRunner().invoke(energy_main, [str(a) for a in (*args, *given, "--output", out)])
        assert result.exit_code == 0, result.output
        reports[flag] = json.loads((out / "energy.json").read_text())
    on, off = reports[""], reports["--no-delta-spikes"]
    assert on["settings"]["delta_spikes"] is True and off["settings"]["delta_spikes"] is False
    assert on["totals"]["snn_acs_per_step"] < off["totals"]["snn_acs_per_step"]
    assert on["totals"]["snn_macs_per_step"] == off["totals"]["snn_macs_per_step"]
