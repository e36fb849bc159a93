"""What a calibration costs, before it runs: the unit costs timed on this machine, the estimate of the whole
recipe per phase, the recipe scaled down to a time budget, and the one progress bar (with the ETA of the
whole run) that every phase advances.

The estimate times the original UNet's forward and one distillation step of a copy of the student on random
inputs (a second or two on the shipped model, a minute or two on ddpm-cifar10-32: a small share of either run) and
extrapolates the rest from them with the constants below. It is a forecast: the progress bar's ETA comes
from the rate actually achieved, so it corrects itself as the run goes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from .. import distributed
from ..converter import quantize
from ..converter.building import spatial_size
from ..converter.probes import conditioning_kwargs, move_kwargs
from .distill import _trainable_groups, make_optimizer
from .output_filter import FIT_INPUTS

if TYPE_CHECKING:
    from .calibrate import CalibrationConfig

SNN_STEP_FACTOR = 1.1
"""An SNN fine-tuning step on B inputs at T time steps costs about this times a QCFS distillation step on
T * B inputs (the spiking model runs the same layers on the time-folded batch, plus its neuron updates; 1.04
measured on the shipped model at T = 4)."""

STATISTICS_PASSES = 3.0
"""Site-input collection (before and after calibration, with observers) in forwards of the original UNet."""

MSE_SEARCH_S_PER_CHANNEL = 0.85e-3
"""The MSE-optimal threshold search per channel (2.4 s for the shipped model's 2816 channels on an AMD EPYC
core; the search's cost depends on the channel count, not on the model's compute)."""

MIN_SAMPLES = 64
MIN_SET_SIZE = 256
MIN_SWEEP_IMAGES = 2
"""The smallest data a budget scales the recipe to (below them the statistics say little)."""

PHASE_LABELS = {
    "samples": "calibration images (DDIM)",
    "statistics": "site statistics and thresholds",
    "labels": "teacher outputs on the calibration set",
    "distill": "QCFS distillation",
    "snn": "SNN fine-tuning",
    "filter": "output filter fit",
    "sweep": "noise-prediction error sweep",
}


@dataclass
class UnitCosts:
    """Seconds per unit of work on this machine, at ``threads`` CPU threads (or on the model's device)."""

    teacher_s: float
    """One forward of the original UNet, per input (timed at the distillation batch size)."""
    student_step_s: float
    """One QCFS distillation step of the distillation batch size (forward, backward, optimizer)."""
    snn_step_s: float
    """One SNN fine-tuning step of its batch size (from the QCFS step, see :data:`SNN_STEP_FACTOR`)."""
    channels: int
    """The activation channels whose thresholds are searched."""
    threads: int
    device: str


@dataclass
class Phase:
    """One phase of the estimate: ``units`` of work (steps, images, inputs) at ``unit_s`` seconds each."""

    name: str
    units: int
    unit_s: float

    @property
    def seconds(self) -> float:
        return self.units * self.unit_s


def _timed(fn: Callable[[], Any], device: torch.device, min_seconds: float = 1.0, max_reps: int = 3) -> float:
    """Mean seconds per call of ``fn`` after one warm-up call, over at least ``min_seconds`` or ``max_reps``."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    reps, start = 0, time.perf_counter()
    while reps < max_reps and (reps == 0 or time.perf_counter() - start < min_seconds):
        call()
        reps += 1
    return (time.perf_counter() - start) / reps


def measure_unit_costs(teacher: UNet2DModel, config: CalibrationConfig) -> UnitCosts:
    """Time the original UNet's forward and one distillation step of its QCFS network (quantized here as
    ``config`` says, thresholds left at 1, then discarded) on random inputs.

    Torch's global random state does not change, so a calibration's result is the same with or without this.
    """
    param = next(teacher.parameters())
    unet_config = teacher.config
    height, width = spatial_size(unet_config.sample_size)
    batch = config.distill.batch_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet_config.in_channels, height, width, generator=generator).to(param.device, param.dtype)
    t = torch.randint(1, 1000, (batch,), generator=generator).to(param.device)
    # random conditioning (labels, encoder_hidden_states) of a conditional UNet: the timing does not depend on it
    kwargs = move_kwargs(conditioning_kwargs(dict(unet_config), batch, generator), x)
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            teacher_s = _timed(lambda: teacher(x, t, **kwargs).sample, param.device) / batch
        qnet = quantize(
            teacher,
            levels=config.resolved_levels,
            phi=config.phi,
            per_channel=config.per_channel,
            init=None,
            residual_spikes=config.residual_spikes,
        )
        student = qnet.eval()
        settings = dataclasses.replace(config.distill, train="weights")
        groups = _trainable_groups(student, settings)
        params = [p for group in groups for p in group["params"]]
        optimizer = make_optimizer(groups, params[0].device)

        def step() -> None:
            loss = student(x, t, **kwargs).sample.float().pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()

        student_step_s = _timed(step, param.device)
    snn_step_s = student_step_s / batch * config.snn.batch_size * config.timesteps * SNN_STEP_FACTOR
    channels = sum(unit.channels for unit in qnet.sites().values())
    return UnitCosts(teacher_s, student_step_s, snn_step_s, channels, torch.get_num_threads(), str(param.device))


def plan_phases(
    config: CalibrationConfig, costs: UnitCosts, samples_cached: bool, done: dict[str, int] | None = None
) -> list[Phase]:
    """The work of ``config``'s recipe, phase by phase, at ``costs``; ``done`` gives units already done
    (steps of a resumed phase), which the plan leaves out."""
    done = done or {}
    draw_images = not samples_cached and not config.image_dir
    stats_inputs = config.stats_batches * 64
    stats_s = STATISTICS_PASSES * stats_inputs * costs.teacher_s
    if config.threshold_init == "mse":
        stats_s += MSE_SEARCH_S_PER_CHANNEL * costs.channels
    teacher_batch = costs.teacher_s * config.distill.batch_size  # block matching runs the teacher at every step
    distill_s = costs.student_step_s + (teacher_batch if config.distill.block_loss_weight > 0 else 0.0)
    snn_teacher = costs.teacher_s * config.snn.batch_size
    snn_s = costs.snn_step_s + (snn_teacher if config.snn.block_loss_weight > 0 else 0.0)
    # teacher once, QCFS and SNN before and after: the SNN at T costs about T forwards
    sweep_s = costs.teacher_s * len_sweep(config) * (1 + 2 + 2 * config.timesteps * SNN_STEP_FACTOR)
    filter_passes = config.timesteps * SNN_STEP_FACTOR  # the filter is fitted on the SNN at T
    filter_inputs = min(config.set_size, FIT_INPUTS) if config.output_filter else 0
    phases = [
        Phase("samples", config.num_samples if draw_images else 0, costs.teacher_s * config.sampler_steps),
        Phase("statistics", 1, stats_s),
        Phase("labels", config.set_size if config.needs_labels else 0, costs.teacher_s),
        Phase("distill", config.distill.steps, distill_s),
        Phase("snn", config.snn.steps, snn_s),
        # one pass of the SNN at T over part of the set
        Phase("filter", filter_inputs, costs.teacher_s * filter_passes),
        Phase("sweep", 2 if config.sweep_images else 0, sweep_s / 2),  # before and after
    ]
    for phase in phases:
        phase.units = max(0, phase.units - done.get(phase.name, 0))
    return phases


def len_sweep(config: CalibrationConfig) -> int:
    """Noised inputs of the noise-prediction error sweep."""
    from .sweep import SWEEP_TIMESTEPS

    return config.sweep_images * len(SWEEP_TIMESTEPS)


def describe_estimate(phases: list[Phase], costs: UnitCosts) -> str:
    """One line: the total and the phases that cost something."""
    parts = []
    for phase in phases:
        if phase.units == 0:
            continue
        if phase.name in ("distill", "snn"):
            parts.append(f"{PHASE_LABELS[phase.name]} {phase.units} x {phase.unit_s:.3g} s")
        else:
            parts.append(f"{PHASE_LABELS[phase.name]} {phase.seconds:.0f} s")
    where = f"{costs.threads} CPU thread{'s' if costs.threads != 1 else ''}" if costs.device == "cpu" else costs.device
    total = sum(phase.seconds for phase in phases)
    return f"Calibration estimate: {_minutes(total)} on {where} ({'; '.join(parts)})."


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class BudgetFit:
    """A recipe fitted to a budget: the config that runs, what changed, and the estimates."""

    config: CalibrationConfig
    changes: dict[str, list[int]]
    """Setting -> ``[requested, used]``, for each setting the budget scaled down."""
    estimate_s: float
    requested_estimate_s: float
    fits: bool

    def message(self, budget_minutes: float) -> str:
        """``"Budget 3 min: distillation 2000 -> 700 steps, ... (estimated ...)"``."""
        if not self.changes:
            return (
                f"Budget {budget_minutes:g} min: the recipe fits (estimated {_minutes(self.estimate_s)}); "
                "nothing scaled."
            )
        names = {
            "distill_steps": ("QCFS distillation", "steps"),
            "snn_steps": ("SNN fine-tuning", "steps"),
            "num_samples": ("calibration images", "images"),
            "set_size": ("calibration set", "inputs"),
            "sweep_images": ("error sweep", "images"),
        }
        scaled = ", ".join(
            f"{names[key][0]} {before} -> {after} {names[key][1]}" for key, (before, after) in self.changes.items()
        )
        verdict = "" if self.fits else "; the smallest recipe does not fit, it runs anyway"
        return (
            f"Budget {budget_minutes:g} min: {scaled} (estimated {_minutes(self.estimate_s)}, the full recipe "
            f"{_minutes(self.requested_estimate_s)}{verdict}). A scaled-down recipe calibrates less well."
        )


def fit_to_budget(config: CalibrationConfig, costs: UnitCosts, samples_cached: bool) -> BudgetFit:
    """``config`` scaled down so that its estimate fits ``config.budget_minutes``.

    First the data phases (images to draw, calibration set, sweep; the output filter's fit follows the set's
    size), only if they take more than a third of the budget, down to a third of it (not below
    :data:`MIN_SAMPLES`, :data:`MIN_SET_SIZE`, :data:`MIN_SWEEP_IMAGES`; images already in the cache cost
    nothing and are kept); then the distillation
    and SNN fine-tuning steps, by the same factor, to fill what is left (at least one step each, where the
    recipe has any). Learning-rate schedules follow the new step counts.
    """
    budget = config.budget_minutes * 60
    requested = sum(phase.seconds for phase in plan_phases(config, costs, samples_cached))
    if requested <= budget:
        return BudgetFit(config, {}, requested, requested, True)
    fitted = copy.deepcopy(config)

    def seconds(names: tuple[str, ...]) -> float:
        return sum(p.seconds for p in plan_phases(fitted, costs, samples_cached) if p.name in names)

    data_phases, training = ("samples", "labels", "sweep"), ("distill", "snn")  # the filter fit: fixed
    data_s = seconds(data_phases)
    if data_s > budget / 3:
        factor = budget / 3 / data_s
        if not samples_cached and not config.image_dir:
            fitted.num_samples = _scaled(config.num_samples, factor, MIN_SAMPLES)
        fitted.set_size = _scaled(config.set_size, factor, MIN_SET_SIZE)
        fitted.sweep_images = _scaled(config.sweep_images, factor, MIN_SWEEP_IMAGES)
    fixed = sum(p.seconds for p in plan_phases(fitted, costs, samples_cached)) - seconds(training)
    trained = seconds(training)
    factor = max(0.0, budget - fixed) / trained if trained else 1.0
    if factor < 1:
        fitted.distill = dataclasses.replace(config.distill, steps=_scaled(config.distill.steps, factor, 1))
        fitted.snn = dataclasses.replace(config.snn, steps=_scaled(config.snn.steps, factor, 1))
    estimate = sum(phase.seconds for phase in plan_phases(fitted, costs, samples_cached))
    pairs = {
        "distill_steps": (config.distill.steps, fitted.distill.steps),
        "snn_steps": (config.snn.steps, fitted.snn.steps),
        "num_samples": (config.num_samples, fitted.num_samples),
        "set_size": (config.set_size, fitted.set_size),
        "sweep_images": (config.sweep_images, fitted.sweep_images),
    }
    changes = {key: [before, after] for key, (before, after) in pairs.items() if before != after}
    return BudgetFit(fitted, changes, estimate, requested, estimate <= budget * 1.001)


def _scaled(value: int, factor: float, minimum: int) -> int:
    """``value * factor`` rounded down, not below ``minimum`` (nor above ``value``; 0 stays 0)."""
    if value == 0:
        return 0
    return min(value, max(minimum, math.floor(value * factor)))


def apply_plan(config: CalibrationConfig, plan: dict[str, int]) -> CalibrationConfig:
    """``config`` with the sizes of a budget plan (``{"distill_steps": 700, ...}``, as :class:`BudgetFit`
    ``changes`` record them), e.g. the one a checkpoint saved."""
    fitted = copy.deepcopy(config)
    for key, value in plan.items():
        if key == "distill_steps":
            fitted.distill = dataclasses.replace(fitted.distill, steps=value)
        elif key == "snn_steps":
            fitted.snn = dataclasses.replace(fitted.snn, steps=value)
        else:
            setattr(fitted, key, value)
    return fitted


class CalibrationProgress:
    """One progress bar over the whole calibration.

    Its length is the estimate in seconds; each phase advances it by its estimated share as its units of
    work complete, and the ETA is tqdm's average rate over the whole run: estimated seconds done per real
    second, so a machine slower than the estimate shows it within a few steps. The postfix names the phase
    and its step, with the loss while training. Without an estimate (``phases`` None) or ``enabled`` off it
    shows nothing.
    """

    def __init__(self, phases: list[Phase] | None, enabled: bool = True):
        self.phases = {phase.name: phase for phase in phases or []}
        self.enabled = enabled and phases is not None
        self.advanced: dict[str, float] = {}
        total = sum(phase.seconds for phase in self.phases.values())
        self.bar = tqdm(
            total=max(total, 1e-9),
            desc="calibration",
            disable=not self.enabled,
            smoothing=0.0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        )
        first = [name for name, phase in self.phases.items() if phase.units]
        if self.enabled and first:
            self.bar.set_postfix_str(PHASE_LABELS[first[0]])

    def advance(self, name: str, units: float = 1, postfix: str = "") -> None:
        """``units`` of phase ``name`` done."""
        if not self.enabled or name not in self.phases:
            return
        phase = self.phases[name]
        amount = min(units * phase.unit_s, phase.seconds - self.advanced.get(name, 0.0))
        amount = max(0.0, min(amount, self.bar.total - self.bar.n))  # float sums never overshoot the bar
        self.advanced[name] = self.advanced.get(name, 0.0) + amount
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(amount)

    def finish(self, name: str) -> None:
        """Phase ``name`` is over (its remaining share, e.g. of cached images, is passed); the postfix names
        the next phase with work to do."""
        if not self.enabled or name not in self.phases:
            return
        self.advance(name, self.phases[name].units)
        names = list(self.phases)
        following = [n for n in names[names.index(name) + 1 :] if self.phases[n].units]
        if following:
            self.bar.set_postfix_str(PHASE_LABELS[following[0]])

    def counter(self, name: str) -> Callable[[int], None]:
        """``callback(n)``: ``n`` more units of ``name`` done by this process (the images, labelling and filter
        batches). Data-parallel, every process does its share at about the same pace, so the bar counts
        ``n`` times the number of processes (the bar shows only on the main one)."""
        label = PHASE_LABELS[name]
        done = [0]
        total = self.phases[name].units if name in self.phases else 0
        processes = distributed.world_size()

        def callback(units: int) -> None:
            done[0] = min(done[0] + units * processes, total)
            self.advance(name, units * processes, f"{label} {done[0]}/{total}")

        return callback

    def stepper(self, name: str, total: int) -> Callable[[int, float], None]:
        """``callback(steps_done, loss)`` for :func:`~spiking_diffusers.calibration.distill.distill`."""
        label = PHASE_LABELS[name]

        def callback(steps_done: int, loss: float) -> None:
            self.advance(name, 1, f"{label} {steps_done}/{total}, loss {loss:.4f}")

        return callback

    def close(self) -> None:
        self.bar.close()


def no_progress() -> CalibrationProgress:
    """A progress object that shows nothing."""
    return CalibrationProgress(None, enabled=False)
