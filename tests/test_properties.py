"""Property-based tests (hypothesis) of the QCFS unit and the IF neuron on arbitrary inputs.

The invariants the conversion rests on, for any input, threshold, T and L: the QCFS output lies on its
L + 1 levels in [0, lambda]; an IF neuron fires at most once per step (count in [0, T], mean output in
[0, lambda]); a signed neuron's net count never goes negative; and the unit-threshold form (input
divided by lambda, threshold 1, output times lambda) gives the lambda form's output.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.converter.qcfs import qcfs

# derandomize: CI draws the same examples on every run, so a landing never depends on a lucky draw
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

thresholds = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
shifts = st.sampled_from([0.0, 0.25, 0.5, 0.75])
neuron_types = st.sampled_from(["if", "signed_if"])


@st.composite
def currents(draw, max_steps: int = 12) -> torch.Tensor:
    """Input currents of shape ``(T, B)``: any finite values, constant or changing over time."""
    steps = draw(st.integers(min_value=1, max_value=max_steps))
    batch = draw(st.integers(min_value=1, max_value=6))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = draw(st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=steps * batch, max_size=steps * batch))
    return torch.tensor(values, dtype=torch.float64).reshape(steps, batch) * scale


def neuron_with(threshold: float, phi: float, kind: str) -> IFNeuron:
    neuron = IFNeuron(channels=1, phi=phi, neuron=kind).double()
    with torch.no_grad():
        neuron.threshold.fill_(threshold)
    return neuron


def run_stepwise(neuron: IFNeuron, current: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Outputs ``(T, B)`` of ``neuron`` fed ``current[t]`` at step t, and its net spike count after each step."""
    neuron.begin(len(current), "stepwise")
    outputs, counts = [], []
    with torch.no_grad():
        for step in current:
            outputs.append(neuron(step.reshape(-1, 1)).reshape(-1))
            if "spike_count" in neuron.memory_names():
                counts.append(neuron.spike_count.reshape(-1).clone())
    return torch.stack(outputs), counts


def run_batched(neuron: IFNeuron, current: torch.Tensor) -> torch.Tensor:
    neuron.begin(len(current), "batched")
    with torch.no_grad():
        return neuron(current.reshape(-1, 1)).reshape(current.shape)


@SETTINGS
@given(
    z=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=32),
    threshold=thresholds,
    levels=st.integers(1, 16),
    phi=shifts,
)
def test_qcfs_output_lies_on_its_levels_within_zero_and_lambda(z, threshold, levels, phi):
    out = qcfs(torch.tensor(z, dtype=torch.float64), torch.tensor([threshold], dtype=torch.float64), levels, phi)
    assert ((out >= 0) & (out <= threshold * (1 + 1e-12))).all()
    level = out * levels / threshold
    assert torch.allclose(level, level.round(), atol=1e-9)  # a whole number of steps lambda / L


@SETTINGS
@given(current=currents(), threshold=thresholds, phi=shifts, kind=neuron_types)
def test_spike_counts_within_zero_and_T_and_mean_output_within_zero_and_lambda(current, threshold, phi, kind):
    steps = len(current)
    outputs, _ = run_stepwise(neuron_with(threshold, phi, kind), current)
    spikes = outputs / threshold
    assert torch.equal(spikes, spikes.round()) and spikes.abs().max() <= 1  # one spike (or -1) per step at most
    if kind == "if":
        assert (spikes >= 0).all()
    count = spikes.sum(0)
    assert ((count >= 0) & (count <= steps)).all()
    mean = outputs.mean(0)
    # The mean of T outputs that all equal lambda can round one ulp above lambda in float64.
    assert ((mean >= 0) & (mean <= threshold * (1 + 1e-12))).all()


@SETTINGS
@given(current=currents(), threshold=thresholds, phi=shifts)
def test_signed_neuron_net_count_never_negative(current, threshold, phi):
    outputs, counts = run_stepwise(neuron_with(threshold, phi, "signed_if"), current)
    for step, count in enumerate(counts, start=1):
        assert ((count >= 0) & (count <= step)).all()
    assert torch.equal(counts[-1], (outputs / threshold).sum(0))


@SETTINGS
@given(current=currents(), threshold=thresholds, phi=shifts, kind=neuron_types)
def test_batched_simulation_equals_stepwise(current, threshold, phi, kind):
    stepwise, _ = run_stepwise(neuron_with(threshold, phi, kind), current)
    assert torch.equal(run_batched(neuron_with(threshold, phi, kind), current), stepwise)


@SETTINGS
@given(
    current=currents(),
    exponent=st.integers(-8, 8),
    phi=shifts,
    kind=neuron_types,
    execution=st.sampled_from(["stepwise", "batched"]),
)
def test_unit_threshold_form_equals_lambda_form(current, exponent, phi, kind, execution):
    """Threshold lambda vs threshold 1 on input / lambda with the output times lambda. With lambda a power
    of two the rescaling is exact in floating point, so every spike must agree and the outputs be equal."""
    lam = 2.0**exponent
    run = run_batched if execution == "batched" else lambda neuron, x: run_stepwise(neuron, x)[0]
    lambda_form = run(neuron_with(lam, phi, kind), current)
    unit_form = run(neuron_with(1.0, phi, kind), current / lam) * lam
    assert torch.equal(lambda_form, unit_form)


@SETTINGS
@given(current=currents(), exponent=st.integers(-8, 8), phi=shifts, kind=neuron_types)
def test_unit_form_through_the_input_gain_equals_lambda_form(current, exponent, phi, kind):
    """The same equivalence as the converter builds it where no layer absorbs 1 / lambda: the neuron's own
    ``input_gain`` buffer."""
    lam = 2.0**exponent
    unit = neuron_with(1.0, phi, kind)
    unit.input_gain.fill_(1 / lam)
    lambda_form, _ = run_stepwise(neuron_with(lam, phi, kind), current)
    unit_form, _ = run_stepwise(unit, current)
    assert torch.equal(lambda_form, unit_form * lam)
