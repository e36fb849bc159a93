"""The QCFS unit and the IF neuron on a single layer: formula, gradients and the two QCFS theorems."""

from __future__ import annotations

import math

import pytest
import torch

from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.converter.qcfs import QCFSActivation, clip_floor, qcfs


def simulate(neuron: IFNeuron, current: torch.Tensor, num_steps: int, execution: str = "batched") -> torch.Tensor:
    """Mean output of ``neuron`` over ``num_steps`` steps of the constant input ``current``."""
    neuron.begin(num_steps, execution)
    with torch.no_grad():
        if execution == "batched":
            out = neuron(current.repeat(num_steps, *([1] * (current.dim() - 1))))
            return out.unflatten(0, (num_steps, -1)).mean(0)
        return torch.stack([neuron(current) for _ in range(num_steps)]).mean(0)


def test_formula_levels_and_clipping():
    lam = torch.tensor([2.0])
    z = torch.tensor([-1.0, 0.0, 0.24, 0.26, 0.99, 1.01, 1.74, 1.76, 3.0])
    # L = 4, lambda = 2: levels at 0, 0.5, 1, 1.5, 2 with the shift of half a level
    expected = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0])
    assert torch.equal(qcfs(z, lam, levels=4, phi=0.5), expected)


def test_shift_moves_the_steps():
    lam = torch.tensor([1.0])
    z = torch.tensor([0.3, 0.6])
    assert torch.equal(qcfs(z, lam, levels=2, phi=0.0), torch.tensor([0.0, 0.5]))
    assert torch.equal(qcfs(z, lam, levels=2, phi=0.5), torch.tensor([0.5, 0.5]))


def test_per_channel_thresholds_broadcast_on_dim1():
    z = torch.full((1, 2, 3, 3), 5.0)
    out = qcfs(z, torch.tensor([1.0, 4.0]), levels=4)
    assert torch.equal(out[0, 0], torch.ones(3, 3)) and torch.equal(out[0, 1], torch.full((3, 3), 4.0))


def test_straight_through_gradients():
    lam = torch.tensor([1.0], requires_grad=True)
    z = torch.tensor([-0.5, 0.3, 0.6, 2.0], requires_grad=True)
    qcfs(z, lam, levels=4, phi=0.5).sum().backward()
    # inside (-lambda/2L, lambda - lambda/2L) = (-0.125, 0.875) the input gets 1, outside 0
    assert torch.equal(z.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # lambda: 1 from the saturated input, the quantization-error gradient from the two inside
    inside = sum((math.floor(v * 4 + 0.5) - v * 4) / 4 for v in (0.3, 0.6))  # LSQ: round(z/s) - z/s
    assert lam.grad.item() == pytest.approx(1.0 + inside, abs=1e-6)


def _clip_floor_by_autograd(z, lam, levels, phi, low):
    """The clip-floor as autograd's graph of it: floor with a straight-through residual, clamp, scale."""
    u = z * levels / lam + phi
    return lam / levels * torch.clamp(u + (torch.floor(u) - u).detach(), low, levels)


@pytest.mark.parametrize(
    "z_shape, lam_shape, low",
    [
        ((4, 6, 5, 5), (1, 6, 1, 1), 0),  # per-channel QCFS unit
        ((4, 6, 5, 5), (), 0),  # one threshold per site
        ((4, 6, 5, 5), (1, 6, 1, 1), -8),  # signed encoder, range [-L, L]
        ((4, 7, 6), (6,), -8),  # token-major input, thresholds on the last dim
        ((4, 6, 5, 5), (4, 6, 1, 1), 0),  # timestep-aware thresholds: one row per sample
    ],
)
def test_clip_floor_matches_autograds_graph_of_the_expression(z_shape, lam_shape, low):
    torch.manual_seed(0)
    z0, lam0 = torch.randn(z_shape) * 3, torch.rand(lam_shape) + 0.5
    grad = torch.randn(z_shape)
    results = []
    for function in (_clip_floor_by_autograd, clip_floor):
        z, lam = z0.clone().requires_grad_(), lam0.clone().requires_grad_()
        out = function(z, lam, 8, 0.5, low)
        out.backward(grad)
        results.append((out.detach(), z.grad, lam.grad))
    (out_ref, gz_ref, glam_ref), (out, gz, glam) = results
    assert torch.equal(out, out_ref)  # the same values, bit for bit
    assert torch.allclose(gz, gz_ref, atol=1e-6)  # 1 inside the range, 0 where it saturates
    assert (gz_ref == 0).any() and (gz_ref != 0).any()
    assert torch.allclose(glam, glam_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the plain expression without gradients: the same values again
        assert torch.equal(clip_floor(z0, lam0, 8, 0.5, low), out_ref)


def test_unit_ann_mode_runs_the_original_activation():
    unit = QCFSActivation(torch.nn.SiLU(), channels=3, levels=4)
    z = torch.randn(2, 3)
    unit.mode = "ann"
    assert torch.equal(unit(z), torch.nn.functional.silu(z))


@pytest.mark.parametrize("levels", [1, 2, 4, 8])
def test_theorem1_constant_input_T_equals_L_reproduces_clip_floor(levels):
    lam = 1.5
    neuron = IFNeuron(channels=1, phi=0.0)
    neuron.threshold.data.fill_(lam)
    z = torch.linspace(-0.5, 2.0, 1001, dtype=torch.float64).reshape(-1, 1)
    neuron.double()
    expected = qcfs(z, torch.tensor([lam], dtype=torch.float64), levels=levels, phi=0.0)
    assert torch.allclose(simulate(neuron, z, levels), expected, atol=1e-12)


@pytest.mark.parametrize(("levels", "steps"), [(4, 2), (4, 7), (8, 3), (2, 16)])
def test_theorem2_shifted_mean_error_vanishes_for_T_not_L(levels, steps):
    lam = 1.0
    neuron = IFNeuron(channels=1, phi=0.5).double()
    neuron.threshold.data.fill_(lam)
    z = torch.linspace(0.0, lam, 20001, dtype=torch.float64).reshape(-1, 1)  # uniform over the range
    error = simulate(neuron, z, steps) - qcfs(z, torch.tensor([lam], dtype=torch.float64), levels, 0.5)
    assert abs(error.mean().item()) < 2e-3
    # without the shift the error is biased by about half a level
    unshifted = IFNeuron(channels=1, phi=0.0).double()
    unshifted.threshold.data.fill_(lam)
    biased = simulate(unshifted, z, steps) - qcfs(z, torch.tensor([lam], dtype=torch.float64), levels, 0.0)
    assert abs(biased.mean().item()) > 0.05


def test_fixed_L_growing_T_tends_to_the_clip_function_not_to_qcfs():
    """With L fixed and T growing the IF rate approaches clip(z, 0, lambda) (L -> infinity)."""
    neuron = IFNeuron(channels=1, phi=0.5).double()
    z = torch.linspace(-0.2, 1.2, 2001, dtype=torch.float64).reshape(-1, 1)
    clip = z.clamp(0, 1)
    quantized = qcfs(z, torch.ones(1, dtype=torch.float64), levels=4)
    errors = [(simulate(neuron, z, steps) - clip).abs().max().item() for steps in (4, 16, 64, 256)]
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1 / 256 + 1e-9
    assert (simulate(neuron, z, 256) - quantized).abs().max().item() > 0.1


def test_L_equals_T_growing_tends_to_qcfs_of_that_L():
    neuron = IFNeuron(channels=1, phi=0.5).double()
    z = torch.rand(4000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    for steps in (2, 8, 32):
        target = qcfs(z, torch.ones(1, dtype=torch.float64), levels=steps)
        assert torch.allclose(simulate(neuron, z, steps), target, atol=1e-12)


def test_stepwise_equals_batched_single_layer():
    neuron = IFNeuron(channels=3, per_channel=True, neuron="signed_if").double()
    neuron.threshold.data = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    current = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(simulate(neuron, current, 6), simulate(neuron, current, 6, "stepwise"))


def test_signed_neuron_cancels_early_spikes():
    """A positive burst then negative input: plain IF keeps the spike, signed IF takes it back."""
    current = torch.tensor([[1.0], [0.0], [-1.0], [-1.0]], dtype=torch.float64)  # (T=4, B=1)
    plain, signed = IFNeuron(1).double(), IFNeuron(1, neuron="signed_if").double()
    for neuron in (plain, signed):
        neuron.begin(4, "batched")
    with torch.no_grad():
        assert plain(current).sum().item() == 1.0
        assert signed(current).sum().item() == 0.0


def test_threshold_scale_lowers_the_firing_threshold_only():
    neuron = IFNeuron(1).double()
    z = torch.full((1, 1), 0.49, dtype=torch.float64)
    assert simulate(neuron, z, 1).item() == 0.0
    neuron.threshold_scale = 0.9  # fires at 0.45 now, with the same amplitude 1
    assert simulate(neuron, z, 1).item() == 1.0
