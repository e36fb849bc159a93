"""Energy and spike accounting: hand-computed counts on tiny layer chains, the ANN's analytic MAC count,
and the per-layer report of a converted UNet and ``sdm-energy`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from conftest import TINY_CONFIGS, make_inputs, make_unet
from spiking_diffusers import convert, quantize
from spiking_diffusers.commands.energy import main as energy_main
from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.energy.accounting import GROUPNORM_OPS, SOFTMAX_OPS, OperationCounter, conv_acs
from spiking_diffusers.energy.measure import count_forward, count_sampling, measure_energy
from spiking_diffusers.energy.report import format_summary
from spiking_diffusers.pipelines import make_scheduler

DIAGONAL = torch.eye(3).reshape(1, 1, 3, 3)


def spiking_chain(consumer: nn.Module, steps: int = 1, neuron: str = "if") -> nn.Sequential:
    """An IF neuron (threshold 1, v(0) = 1/2) feeding ``consumer``: a current of 1 makes it fire at once."""
    chain = nn.Sequential(IFNeuron(1, neuron=neuron), consumer).eval()
    chain[0].begin(steps, "batched")
    return chain


def count(model: nn.Module, x: torch.Tensor):
    with torch.no_grad(), OperationCounter(model) as counter:
        model(x)
    return counter.accounting


@pytest.mark.parametrize(
    ("stride", "expected"),
    [
        # padding 1, stride 1: the corner spikes reach 4 output positions, the centre one all 9: 17 x 2 channels
        (1, 34),
        # stride 2 gives a 2x2 output centred on the corners: each corner spike reaches 1, the centre 4: 6 x 2
        (2, 12),
    ],
)
def test_conv_acs_of_a_known_spike_pattern(stride, expected):
    accounting = count(spiking_chain(nn.Conv2d(1, 2, 3, padding=1, stride=stride)), DIAGONAL)
    layer = accounting.layers[("1", "conv3x3")]
    assert layer.spike_driven and layer.acs == expected and layer.macs == 0
    assert layer.input_spikes == 3 and layer.firing_rate == pytest.approx(3 / 9)
    assert accounting.sites["0"].spikes == 3


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"), [(1, 0, 1, 1), (2, 1, 1, 2), (1, 2, 2, 1), (3, 1, 1, 4)]
)
def test_conv_acs_equal_the_receptive_field_count(stride, padding, dilation, groups):
    """Against a brute-force count: every (output position, input tap) pair that reads a spike, x C_out / groups."""
    indicator = (torch.rand(2, 4, 9, 7, generator=torch.Generator().manual_seed(0)) < 0.3).double()
    weight = torch.zeros(8, 4 // groups, 3, 3)
    taps = F.unfold(indicator, 3, dilation=dilation, padding=padding, stride=stride)
    assert conv_acs(indicator, weight, stride, padding, dilation, groups) == int(taps.sum()) * 8 // groups


def test_linear_acs_and_negative_spikes():
    """A signed neuron's +1 then -1 spike both count: 2 spikes x 3 outputs."""
    chain = spiking_chain(nn.Linear(1, 3), steps=2, neuron="signed_if")
    layer = count(chain, torch.tensor([[0.6], [-0.6]])).layers[("1", "linear")]
    assert layer.spike_driven and layer.acs == 6 and layer.input_spikes == 2 and layer.firing_rate == 1.0


def test_all_zero_input_gives_no_acs():
    accounting = count(spiking_chain(nn.Conv2d(1, 2, 3, padding=1)), torch.zeros(1, 1, 3, 3))
    assert accounting.acs == 0 and accounting.macs == 0


def test_real_valued_input_costs_macs():
    """The same convolution fed the raw pattern (no neuron): dense MACs, 9 outputs x 9 taps x 2 channels."""
    accounting = count(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)), DIAGONAL)
    assert accounting.layers[("0", "conv3x3")].macs == 162 and accounting.acs == 0


class SmallNet(nn.Module):
    """Conv, GroupNorm, diffusers attention and a linear layer, with MACs easy to count by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.norm = nn.GroupNorm(2, 8)
        self.attn = Attention(query_dim=8, heads=2, dim_head=4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.norm(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 16 tokens, 8)
        return self.head(self.attn(h))


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])  # fused SDPA, or baddbmm/softmax/bmm
def test_ann_macs_equal_the_analytic_count(processor):
    tokens, dim, heads = 16, 8, 2
    expected = (
        tokens * 8 * 27  # conv: 4x4 outputs x 8 channels x 3x3x3 taps
        + GROUPNORM_OPS * tokens * 8
        + 4 * tokens * dim * dim  # to_q, to_k, to_v, to_out
        + 2 * tokens * tokens * dim  # QK^T and softmax(QK^T) V, over both heads of dim 4
        + SOFTMAX_OPS * heads * tokens * tokens
        + tokens * dim * 5  # head
    )
    net = SmallNet().eval()
    net.attn.set_processor(processor())
    accounting = count(net, torch.randn(1, 3, 8, 8))
    assert accounting.macs == expected and accounting.acs == 0


@pytest.fixture(scope="module")
def tiny_snn():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=4, num_samples=2)
    return unet, qnet


def test_every_neuron_feeds_a_spike_driven_layer_in_both_threshold_forms(tiny_snn):
    unet, qnet = tiny_snn
    sample, timestep, _ = make_inputs(unet)
    counts = {}
    for form in ("lambda", "unit"):
        snn = convert(qnet, timesteps=4, threshold_form=form)
        with torch.no_grad(), OperationCounter(snn) as counter:
            snn(sample, timestep)
        counts[form] = counter.accounting
        spike_driven = [layer for layer in counter.accounting.layers.values() if layer.spike_driven]
        assert len(spike_driven) == len(snn.neurons())
    assert counts["lambda"].acs == counts["unit"].acs > 0
    assert counts["lambda"].macs == counts["unit"].macs


def test_batched_and_stepwise_simulations_count_the_same_spikes():
    unet = make_unet(TINY_CONFIGS["attention"])  # float64: both simulations make the same spike decisions
    qnet = quantize(unet, levels=4, num_samples=2)
    sample, timestep, _ = make_inputs(unet)
    acs = []
    for execution in ("batched", "stepwise"):
        snn = convert(qnet, timesteps=4, execution=execution)
        with torch.no_grad(), OperationCounter(snn) as counter:
            snn(sample, timestep)
        acs.append(counter.accounting.acs)
    assert acs[0] == acs[1] > 0


def test_report_over_a_sampling_run(tiny_snn):
    unet, qnet = tiny_snn
    snn = convert(qnet, timesteps=2)
    scheduler = make_scheduler("ddim", {"num_train_timesteps": 1000})
    report = measure_energy(snn, unet, scheduler, steps=3, num_images=2)
    assert 0 < report.spike_driven_fraction < 1 and 0 < report.weight_layer_spike_fraction < 1
    assert report.unet_evaluations_per_image == 3
    assert report.ann_macs == count_forward(unet).macs  # per image per step
    # the SNN runs every real-valued op once per time step; the time-constant input conv shows it plainly
    conv_in = next(row for row in report.rows if row.name == "conv_in")
    assert conv_in.macs == 2 * conv_in.ann_macs and not conv_in.spike_driven
    # the documented 45 nm model (4.6 pJ per MAC, 0.9 pJ per AC), and the rows add up to the totals
    assert report.snn_energy_pj == pytest.approx(4.6 * report.snn_macs + 0.9 * report.snn_acs)
    assert report.ann_energy_pj == pytest.approx(4.6 * report.ann_macs)
    assert sum(row.energy_pj for row in report.rows) == pytest.approx(report.snn_energy_pj)
    assert sum(row.ann_energy_pj for row in report.rows) == pytest.approx(report.ann_energy_pj)
    assert set(report.site_rates) == set(snn.neurons())


def test_a_t_schedule_costs_its_mean_t_and_the_ratio_divides_by_unet_evaluations(tiny_snn):
    """T = 1, 1, 3 over three DDIM steps (schedule "1,3x1"): the SNN's figures per denoising step are means over
    the steps, so the time-constant input conv costs (1 + 1 + 3) / 3 of the ANN's MACs per step; per image the
    run made 3 UNet evaluations (not 3 x mean T), and the ANN is charged one forward for each."""
    unet, qnet = tiny_snn
    snn = convert(qnet, timesteps=2)
    scheduler = make_scheduler("ddim", {"num_train_timesteps": 1000})
    report = measure_energy(snn, unet, scheduler, steps=3, num_images=2, snn_timesteps="1,3x1")
    assert report.timesteps == "1,3x1" and report.mean_timesteps == pytest.approx(5 / 3)
    assert report.unet_evaluations_per_image == 3
    conv_in = next(row for row in report.rows if row.name == "conv_in")
    assert conv_in.macs == pytest.approx(5 / 3 * conv_in.ann_macs) and not conv_in.spike_driven
    assert report.ann_macs == count_forward(unet).macs
    raw = count_sampling(snn, make_scheduler("ddim", {"num_train_timesteps": 1000}), 3, 2, snn_timesteps=[1, 1, 3])
    assert report.snn_macs == pytest.approx(raw.macs / (2 * 3)) and report.snn_acs == pytest.approx(raw.acs / 6)
    totals = report.totals()
    assert totals["timesteps"] == "1,3x1" and totals["mean_timesteps_per_step"] == pytest.approx(5 / 3)
    assert totals["snn_energy_mj_per_image"] / totals["ann_energy_mj_per_image"] == pytest.approx(report.energy_ratio)
    assert "T = 1,3x1, mean T = 1.667" in format_summary(report)
    # a constant schedule is plain T, and states it so
    plain = measure_energy(snn, unet, scheduler, steps=3, num_images=2, snn_timesteps=[2, 2, 2])
    assert plain.timesteps == 2 and plain.mean_timesteps == 2.0
    assert "Per denoising step (T = 2):" in format_summary(plain)
    model_t = measure_energy(snn, unet, scheduler, steps=3, num_images=2)
    assert model_t.timesteps == 2 and model_t.snn_acs == plain.snn_acs


def test_sdm_energy_end_to_end(tmp_path, tiny_snn):
    unet, _ = tiny_snn
    unet.save_pretrained(tmp_path / "ann")
    result = CliRunner().invoke(
        energy_main,
        ["--model", str(tmp_path / "ann"), "--output", str(tmp_path / "out"), "-T", "2", "--steps", "2",
         "--num-images", "1", "--rows", "5", "--device", "cpu", "--calibration-samples", "4",
         "--calibration-steps", "2", "--snn-steps", "1", "--calibration-set-size", "64"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # an ANN is measured as the network sdm-convert makes of it (calibrated), and the output says so
    assert "Converting an uncalibrated ANN, calibrated here" in result.output
    assert "Spike-driven share of operations" in result.output and "cheaper rows not shown" in result.output
    report = json.loads((tmp_path / "out" / "energy.json").read_text())
    assert report["settings"]["timesteps"] == 2 and report["totals"]["unet_evaluations_per_image"] == 2
    assert "calibrated here" in report["settings"]["measured"]
    assert 0 < report["totals"]["spike_driven_fraction"] < 1
    assert (tmp_path / "out" / "firing_rates.png").stat().st_size > 0
    assert (tmp_path / "out" / "energy_breakdown.png").stat().st_size > 0

    missing = CliRunner().invoke(energy_main, ["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "No such directory" in missing.output

    args = ["--model", str(tmp_path / "ann"), "--steps", "2", "--num-images", "1", "--device", "cpu", "--no-calibrate"]
    scheduled = CliRunner().invoke(energy_main, [*args, "-T", "2,4x1", "--output", str(tmp_path / "sched")])
    assert scheduled.exit_code == 0, scheduled.output
    assert "T = 2,4x1, mean T = 3" in scheduled.output
    report = json.loads((tmp_path / "sched" / "energy.json").read_text())
    assert report["settings"]["timesteps"] == "2,4x1" and report["settings"]["mean_timesteps"] == 3.0
    assert report["settings"]["levels"] == 2 and report["totals"]["mean_timesteps_per_step"] == 3.0
    for bad, message in (("4x3", "gives T for 3 denoising steps, but there are 2"), ("2,", "has an empty item")):
        result = CliRunner().invoke(energy_main, [*args, "-T", bad, "--output", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output and "accepted:" in result.output
        assert result.output.count("Error:") == 1 and not (tmp_path / "bad").exists()
