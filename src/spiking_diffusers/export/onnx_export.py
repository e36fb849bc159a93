"""ONNX export of the three forms of a converted UNet, each checked against PyTorch with onnxruntime.

- ``qcfs``: the QCFS network as a quantized ANN (clip-floor activations, ONNX ``Floor`` / ``Clip``).
- ``snn``: the spiking network with its T time steps unrolled (batched execution: every weight layer runs
  once on ``T * B`` samples); T is fixed in the graph.
- ``step``: one time step with the state as explicit inputs and outputs (see :mod:`.stepping`).

All graphs take ``sample`` ``(B, C, H, W)`` float32 and ``timestep`` ``(B,)`` int64 (the diffusion
timestep, as DDPM / DDIM schedulers give it), with a dynamic batch size B; the ``qcfs`` and ``snn`` graphs of a
cross-attention UNet also take ``encoder_hidden_states`` ``(B, tokens, cross_attention_dim)`` float32 (the
token count is fixed at export, :data:`~spiking_diffusers.converter.probes.PROBE_TOKENS`). Exported with the
TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) at opset :data:`OPSET`: the dynamo exporter
produces the same graphs but took 25x longer on a tiny UNet at T = 4 (51 s against 2 s), most of it decomposing the T
unrolled neuron loops. Timestep-aware thresholds (K > 1) are in every graph: each picks every sample's row
of the threshold tables from ``timestep``. Limits: no ``class_labels`` input; no single-step graph of a
conditional UNet; float32; threshold guidance is baked in at export time; the batched graph's memory grows with
T like the PyTorch model's.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..converter.building import spatial_size
from ..converter.models import QCFSUNet2DModel, SpikingUNet2DModel
from ..converter.probes import PROBE_TOKENS
from ..converter.timestep_groups import schedule_length
from ..errors import check_finite
from .stepping import SpikingStep

OPSET = 17
TOLERANCE = 1e-4
"""Max abs error allowed between onnxruntime and PyTorch for the QCFS and single-step graphs."""
FLIP_FACTOR = 10.0
"""Where PyTorch's own float32 vs float64 difference exceeds the tolerance, an onnxruntime error up to this many
times that difference is put down to rounding flips (unverified); a larger one is more than rounding explains
(a correct float32 graph is about as far from float64 as PyTorch's float32 is, so within about twice that from
PyTorch's float32 output), and the check fails."""
UNBATCHED = ("step", "next.step")
"""Graph inputs and outputs without a batch dimension: the step index of the single-step graph."""


class _SampleOnly(nn.Module):
    """``(sample, timestep[, encoder_hidden_states]) -> output``: the diffusers model call as a graph with plain
    tensor outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, *conditioning, return_dict=False)[0]


@dataclass
class ExportCheck:
    """One exported graph and how closely onnxruntime reproduced PyTorch on fresh random inputs.

    ``float32_sensitivity`` is how far PyTorch itself moves between float32 and float64 on the same
    inputs: a quantization level or a spike decided within rounding of its boundary flips, and the
    flip propagates. Where that alone exceeds the tolerance, no float32 runtime can be held to it, and a
    larger onnxruntime error of the same order (up to :data:`FLIP_FACTOR` times it) is reported as
    ``"float32-sensitive"``: not a failed export, but not a verified one either, since a slightly wrong
    graph would look the same.
    """

    name: str
    path: Path
    max_abs_error: float
    mean_abs_error: float
    float32_sensitivity: float
    tolerance: float | None
    export_batch: int
    check_batch: int
    seconds: float

    @property
    def status(self) -> str:
        """``"ok"`` (within the tolerance), ``"float32-sensitive"`` (beyond it, but PyTorch moves beyond it
        too by rounding alone, and the error is of that order: unverified), ``"FAILED"`` (beyond the tolerance
        and beyond what rounding explains: the graph is wrong), or ``"reported"`` (no tolerance)."""
        if self.tolerance is None:
            return "reported"
        if self.max_abs_error <= self.tolerance:
            return "ok"
        sensitive = self.float32_sensitivity > self.tolerance
        if sensitive and self.max_abs_error <= FLIP_FACTOR * self.float32_sensitivity:
            return "float32-sensitive"
        return "FAILED"

    @property
    def passed(self) -> bool:
        """Whether onnxruntime reproduced PyTorch within the tolerance (``status == "ok"``). A
        float32-sensitive or tolerance-free check has not passed: it cannot tell a wrong graph from rounding."""
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        """Whether the graph is shown to be wrong (``status == "FAILED"``)."""
        return self.status == "FAILED"


def _float32_cpu(model: nn.Module) -> nn.Module:
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules these models do not have.
    return nn.Module.to(copy.deepcopy(model), device="cpu", dtype=torch.float32).eval()


def random_inputs(model: nn.Module, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A normal random ``sample`` and uniform random diffusion timesteps for ``model`` (and, for a
    cross-attention UNet, normal random ``encoder_hidden_states``), in :func:`input_names` order."""
    config = model.unet.config
    height, width = spatial_size(config.sample_size)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, height, width, generator=generator)
    timestep = torch.randint(1, config.get("num_train_timesteps") or 1000, (batch,), generator=generator)
    width = config.get("cross_attention_dim")
    if width is None:
        return sample, timestep
    return sample, timestep, torch.randn(batch, PROBE_TOKENS, width, generator=generator)


def input_names(model: nn.Module) -> list[str]:
    """The graph inputs of the ``qcfs`` and ``snn`` graphs of ``model``."""
    conditional = model.unet.config.get("cross_attention_dim") is not None
    return ["sample", "timestep"] + (["encoder_hidden_states"] if conditional else [])


def _export(module: nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    batched = {name: {0: "batch"} for name in input_names + output_names if name not in UNBATCHED}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values taken as constants, all intended
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=batched,
            do_constant_folding=False,
        )


def _outputs(module: nn.Module, inputs: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = module(*inputs)
    return [value.double().numpy() for value in (outputs if isinstance(outputs, tuple) else (outputs,))]


def _compare(path: Path, module: nn.Module, inputs: tuple, input_names: list[str]) -> tuple[float, float, float]:
    """Max and mean abs difference between onnxruntime and PyTorch over every output, and the max abs
    difference between PyTorch in float32 and in float64 (the model's own sensitivity to rounding)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in zip(input_names, inputs, strict=True)}
    expected = _outputs(module, inputs)
    for value in expected:
        check_finite(
            torch.from_numpy(value),
            f"PyTorch's output of {path.name} on the check inputs",
            "the model overflows, so the graph cannot be checked; check its weights.",
        )
    errors = np.concatenate(
        [np.abs(got - want).ravel() for got, want in zip(session.run(None, feeds), expected, strict=True)]
    )
    double = nn.Module.to(copy.deepcopy(module), dtype=torch.float64)
    exact = _outputs(double, tuple(x.double() if x.is_floating_point() else x for x in inputs))
    sensitivity = max(float(np.abs(a - b).max()) for a, b in zip(expected, exact, strict=True))
    return float(errors.max()), float(errors.mean()), sensitivity


def export_qcfs(qnet: QCFSUNet2DModel, path: Path, seed: int = 0) -> ExportCheck:
    """Export the QCFS network (export batch 2, checked at batch 3)."""
    module = _SampleOnly(_float32_cpu(qnet))
    return _export_and_check("qcfs", module, qnet, path, TOLERANCE, seed)


def export_snn(snn: SpikingUNet2DModel, path: Path, seed: int = 0) -> ExportCheck:
    """Export the spiking network unrolled over its configured T in batched execution.

    No tolerance: a membrane within float rounding of its threshold fires in one runtime and not the
    other, and the flip propagates; the reported error says how much that moved the output.
    """
    model = _float32_cpu(snn)
    model.set_execution("batched")
    return _export_and_check("snn", _SampleOnly(model), snn, path, None, seed)


def _export_and_check(
    name: str, module: nn.Module, model: nn.Module, path: Path, tolerance: float | None, seed: int
) -> ExportCheck:
    start = time.perf_counter()
    names = input_names(model)
    _export(module, random_inputs(model, 2, seed), path, names, ["output"])
    seconds = time.perf_counter() - start
    errors = _compare(path, module, random_inputs(model, 3, seed + 1), names)
    return ExportCheck(name, path, *errors, tolerance, 2, 3, seconds)


def step_io_names(step: SpikingStep) -> tuple[list[str], list[str]]:
    """Input and output names of the single-step graph."""
    states = step.state_names()
    return ["sample", "timestep", "step", *states], ["output", "next.step", *(f"next.{name}" for name in states)]


@torch.no_grad()
def export_step(snn: SpikingUNet2DModel, path: Path, seed: int = 0) -> tuple[ExportCheck, dict[str, np.ndarray]]:
    """Export one time step with explicit state; returns the check and the initial state for batch 1.

    The check runs at batch 3 from the state PyTorch reaches after T // 2 steps on the check inputs, so
    the membranes and sums are those of a real simulation, not arbitrary numbers. With K > 1 timestep-aware
    threshold groups a membrane starts at phi times its group's threshold, so the initial state has one row
    per group instead (row g for a sample whose timestep is in group g; see :func:`group_timesteps`).
    """
    if snn.unet.config.get("cross_attention_dim") is not None:
        raise ValueError(
            "The single-step graph of a conditional UNet is not supported yet; export its qcfs and snn graphs."
        )
    step = SpikingStep(_float32_cpu(snn)).eval()
    input_names, output_names = step_io_names(step)
    sample, timestep = random_inputs(snn, 2, seed)
    start = time.perf_counter()
    _export(step, (sample, timestep, *step.initial_state(sample, timestep)), path, input_names, output_names)
    seconds = time.perf_counter() - start

    sample, timestep = random_inputs(snn, 3, seed + 1)
    state = step.initial_state(sample, timestep)
    for _ in range(int(snn.config.timesteps) // 2):
        state = step(sample, timestep, *state)[1:]
    errors = _compare(path, step, (sample, timestep, *state), input_names)
    check = ExportCheck("step", path, *errors, TOLERANCE, 2, 3, seconds)
    groups = int(snn.config.threshold_groups)
    one = random_inputs(snn, 1, seed)
    if groups > 1:
        one = (random_inputs(snn, groups, seed)[0], group_timesteps(groups, schedule_length(snn.config.unet_config)))
    initial = dict(zip(input_names[2:], (value.numpy() for value in step.initial_state(*one)), strict=True))
    return check, initial


def group_timesteps(groups: int, length: int) -> torch.Tensor:
    """One diffusion timestep inside each of the ``groups`` ranges of a schedule of ``length`` timesteps (the
    middle of group g's whole timesteps ``ceil(g N / K) ... ceil((g + 1) N / K) - 1``), as int64."""
    bounds = [-(-g * length // groups) for g in range(groups + 1)]
    return torch.tensor([(bounds[g] + bounds[g + 1] - 1) // 2 for g in range(groups)], dtype=torch.int64)
