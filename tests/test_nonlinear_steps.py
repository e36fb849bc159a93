"""Real-valued ops evaluated at E of the T time steps (``nonlinear_steps``): held in between, exact in the
mean, the same in both execution modes, saved with the model, and counted at what they cost."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CONFIGS, make_inputs, make_unet
from spiking_diffusers import SpikingUNet2DModel, convert, quantize
from spiking_diffusers.commands import convert as convert_cmd
from spiking_diffusers.converter.temporal import TemporalOp, evaluated_steps
from spiking_diffusers.energy.accounting import COMPENSATION_OPS, GROUPNORM_OPS, HELD_OPS, OperationCounter


def test_evaluated_steps_include_the_first_and_the_last():
    assert evaluated_steps(4, None) == evaluated_steps(4, 4) == evaluated_steps(4, 9) == [1, 2, 3, 4]
    assert evaluated_steps(4, 2) == [1, 4]
    assert evaluated_steps(8, 3) == [1, 4, 8]  # 1, 4.5, 8, rounded half to even
    with pytest.raises(ValueError, match="at least 2"):
        evaluated_steps(4, 1)


@pytest.mark.parametrize("evaluations", [2, 3])
def test_held_op_is_exact_in_the_mean_and_the_same_in_both_modes(evaluations):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 4).double()
    op = TemporalOp(norm, evaluations=evaluations)
    steps, batch = 5, 3
    x = torch.randn(steps * batch, 4, 3, 3, dtype=torch.float64)
    op.begin(steps, "batched")
    batched = op(x)
    op.begin(steps, "stepwise")
    stepwise = torch.cat([op(x[t * batch : (t + 1) * batch]) for t in range(steps)])
    torch.testing.assert_close(batched, stepwise, rtol=0, atol=1e-12)
    mean_out = batched.reshape(steps, batch, 4, 3, 3).mean(0)
    torch.testing.assert_close(mean_out, norm(x.reshape(steps, batch, 4, 3, 3).mean(0)), rtol=0, atol=1e-12)
    per_step = batched.reshape(steps, batch, 4, 3, 3)
    held = [t for t in range(1, steps + 1) if t not in op.evaluated_steps()]
    for t in held:  # a held step re-emits the value of the last evaluation
        last = max(s for s in op.evaluated_steps() if s < t)
        previous = norm(x.reshape(steps, batch, 4, 3, 3)[:last].mean(0))
        torch.testing.assert_close(per_step[t - 1], previous, rtol=0, atol=1e-12)


def _models(nonlinear_steps):
    unet = make_unet(TINY_CONFIGS["attention"])  # float64
    qnet = quantize(unet, levels=4, num_samples=2)
    return unet, convert(qnet, spike_steps=4, nonlinear_steps=nonlinear_steps)


def test_as_many_evaluations_as_steps_is_the_plain_network():
    unet, full = _models(None)
    _, same = _models(4)
    sample, timestep, _ = make_inputs(unet)
    with torch.no_grad():
        assert torch.equal(full(sample, timestep).sample, same(sample, timestep).sample)


def test_spiking_model_saves_its_nonlinear_steps_and_both_modes_agree(tmp_path):
    unet, snn = _models(2)
    sample, timestep, _ = make_inputs(unet)
    with torch.no_grad():
        batched = snn(sample, timestep).sample
        snn.set_execution("stepwise")
        stepwise = snn(sample, timestep).sample
        torch.testing.assert_close(batched, stepwise, rtol=0, atol=1e-10)
        snn.save_pretrained(tmp_path / "snn")
        loaded = SpikingUNet2DModel.from_pretrained(tmp_path / "snn").double().eval()
        loaded.set_execution("stepwise")
        assert loaded.config.nonlinear_steps == 2
        assert torch.equal(loaded(sample, timestep).sample, stepwise)
        _, full = _models(None)
        assert not torch.equal(full(sample, timestep).sample, batched)  # the held steps do change the spikes


def test_energy_counts_the_evaluations_and_the_held_steps():
    unet, full = _models(None)
    _, held = _models(2)
    sample, timestep, _ = make_inputs(unet)
    counts = {}
    for name, snn in (("full", full), ("held", held)):
        with torch.no_grad(), OperationCounter(snn) as counter:
            snn(sample, timestep)
        by_op = {}
        for (_, op), layer in counter.accounting.layers.items():
            by_op[op] = by_op.get(op, 0) + layer.macs
        counts[name] = by_op
    steps, evaluations = 4, 2
    assert counts["held"]["groupnorm"] * steps == counts["full"]["groupnorm"] * evaluations
    assert counts["full"]["groupnorm"] % GROUPNORM_OPS == 0
    per_step_elements = counts["full"]["compensation"] // (COMPENSATION_OPS * steps)
    expected = per_step_elements * (COMPENSATION_OPS * evaluations + HELD_OPS * (steps - evaluations))
    assert counts["held"]["compensation"] == expected


def test_sdm_convert_option_and_its_usage_error(tmp_path):
    model = tmp_path / "ann"
    make_unet(TINY_CONFIGS["attention"], dtype=torch.float32).save_pretrained(model)
    out = tmp_path / "snn"
    args = ["--model", str(model), "-T", "4", "--no-calibrate", "--output", str(out)]
    result = CliRunner().invoke(convert_cmd.main, [*args, "--nonlinear-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "real-valued ops at 3 of the T steps" in result.output
    assert json.loads((out / "unet" / "config.json").read_text())["nonlinear_steps"] == 3
    refused = CliRunner().invoke(
        convert_cmd.main, [*args[:-1], str(tmp_path / "x"), "-E", "2", "--nonlinear-mode", "per_step"]
    )
    assert refused.exit_code == 2 and "nonlinear_mode='compensated'" in refused.output
    assert not (tmp_path / "x").exists()
