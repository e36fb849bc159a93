"""The calibration recipe: data-free inputs, threshold initialisation, distillation of the QCFS network,
then fine-tuning of the spiking network itself at its target T, then the least-squares fit of its output filter
(:mod:`.output_filter`). One code path for ``sdm-calibrate`` and
for the default calibration that ``sdm-convert`` runs on an uncalibrated model."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from .. import distributed
from ..converter import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from ..converter.encoders import SignedQCFS
from ..converter.output_filter import DEFAULT_FILTER_GROUPS, check_output_filter
from ..converter.probes import move_kwargs
from ..converter.thresholds import (
    collect_group_site_inputs,
    collect_site_inputs,
    init_thresholds,
    quantization_error,
)
from ..errors import InputError
from ..label_tokens import LabelTokens
from ..metrics.noise_prediction import predict_noise
from ..validation import check_int
from .checkpoint import CalibrationCheckpoints
from .conditioning import LabelConditioning, label_conditioning
from .cost import (
    CalibrationProgress,
    UnitCosts,
    apply_plan,
    describe_estimate,
    fit_to_budget,
    measure_unit_costs,
    plan_phases,
)
from .data import (
    CalibrationSet,
    NoisedBatches,
    load_image_folder,
    model_fingerprint,
    sample_cache_path,
    sample_model_images,
)
from .distill import DistillHistory, DistillSettings, distill
from .output_filter import fit_output_filter
from .sweep import error_sweep, sweep_inputs

DEFAULT_BURST = 4
"""Spikes per time step of the default (plain IF) neurons: B = 4 reaches 4T levels in T steps. Measured on both
digits DDPMs at T = 4: 5 dB of paired PSNR over one spike per step and 2 dB over B = 2, for 25 % and 16 % more
energy (benchmarks/low_t.py; docs/calibration.md, "Burst neurons")."""


DEFAULT_OUTPUT_FILTER = 5
"""Kernel size of the output filter fitted after distillation (0: none). A 5 x 5 filter per range of the schedule
takes the noise prediction's error at the first denoising steps from about 0.04 to 0.01-0.02 of its norm on both
digits DDPMs (docs/calibration.md, "The output filter")."""


@dataclass
class CalibrationConfig:
    """Every knob of a calibration run (all of them go into the report). ``residual_spikes`` quantizes with
    signed input encoders on the residual-reading convolutions and the attention projections (see ``quantize``),
    calibrated with the rest; ``None`` (the default) turns them on wherever they are supported (a ``UNet2DModel``;
    not yet a ``UNet2DConditionModel``), see :func:`resolve_residual_spikes`. ``threshold_groups`` K > 1 gives
    every site a table of K thresholds, one per equal range of the diffusion schedule (timestep-aware
    thresholds), each initialised from the calibration inputs in its range and then trained with the rest.
    ``offsets`` gives every activation unit an input shift and an output offset, initialised with its threshold
    and trained with the thresholds; ``None`` (the default) turns them on where they are supported (see
    :func:`resolve_offsets`). ``output_precision`` P > 1 gives the output activation P times the levels
    (and its neurons P times the spikes per step; plain IF only): +0.8 dB of paired PSNR for under 1 % energy,
    but no steady FD gain, so 1 by default (docs/calibration.md, "The output activation"). ``output_filter`` K > 0
    fits a K x K linear filter over the noise prediction and the input, one per ``output_filter_groups`` range of
    the schedule, to the original model's outputs on the calibration set, from the SNN's at T (after its
    fine-tuning, where there is one); 0: none.

    Distillation trains on a fixed calibration set of ``set_size`` noised inputs, labelled once by the
    original model, with timesteps stratified over the whole schedule. ``sweep_images`` images go into the
    report's noise-prediction error sweep (0: none). ``budget_minutes`` scales the recipe down to an
    estimated run time (see :func:`~spiking_diffusers.calibration.cost.fit_to_budget`).
    """

    timesteps: int = 4
    levels: int | None = None
    per_channel: bool = True
    phi: float = 0.5
    neuron: str = "if"
    burst: int | None = None
    tsm: bool = False
    residual_spikes: bool | None = None
    threshold_groups: int = 1
    offsets: bool | None = None
    output_precision: int = 1
    output_filter: int = DEFAULT_OUTPUT_FILTER
    output_filter_groups: int = DEFAULT_FILTER_GROUPS
    threshold_init: str = "mse"
    percentile: float = 99.9
    num_samples: int = 512
    sampler_steps: int = 20
    image_dir: str | None = None
    stats_batches: int = 4
    set_size: int = 4096
    sweep_images: int = 8
    budget_minutes: float | None = None
    distill: DistillSettings = field(default_factory=lambda: DistillSettings(steps=1000, batch_size=32, lr=1e-3))
    snn: DistillSettings = field(default_factory=lambda: DistillSettings(steps=100, batch_size=16, lr=1e-4))
    seed: int = 0
    cache_dir: str | None = None

    @property
    def resolved_burst(self) -> int:
        """B, the spikes per step of the neurons: ``burst``, or by default :data:`DEFAULT_BURST` for plain IF
        neurons (1 for signed IF, or where ``levels`` is given and is not ``DEFAULT_BURST`` x T)."""
        if self.burst is not None:
            return int(self.burst)
        fits = self.levels is None or self.levels == DEFAULT_BURST * self.timesteps
        return DEFAULT_BURST if self.neuron == "if" and fits else 1

    @property
    def needs_labels(self) -> bool:
        """Whether a phase uses the original model's outputs on the calibration set."""
        return bool(self.distill.steps or self.snn.steps or self.output_filter)

    @property
    def resolved_levels(self) -> int:
        """The QCFS levels L: ``levels``, or B x T when it is not set."""
        return int(self.levels or self.resolved_burst * self.timesteps)

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no calibration can run with."""
        if self.timesteps < 1 or self.resolved_levels < 1:
            raise ValueError("timesteps and levels must be at least 1.")
        if self.burst is not None:
            check_int(self.burst, "burst", low=1)
        burst = self.resolved_burst
        if burst > 1 and (self.neuron != "if" or self.resolved_levels != burst * self.timesteps):
            raise ValueError(
                f"burst={burst} needs plain IF neurons and levels = burst x T = {burst * self.timesteps} (a "
                f"burst neuron reaches B x T levels in T steps); got neuron={self.neuron!r}, levels={self.levels}."
            )
        check_int(self.output_precision, "output_precision", low=1)
        if self.output_precision > 1 and self.neuron != "if":
            raise ValueError(
                f"output_precision={self.output_precision} needs plain IF neurons (the output activation becomes a "
                f"burst neuron); got neuron={self.neuron!r}. Use output_precision=1 with signed IF."
            )
        if self.num_samples < 1:
            raise ValueError("num_samples must be at least 1.")
        check_int(self.threshold_groups, "threshold_groups", "threshold_groups")
        check_output_filter(self.output_filter, self.output_filter_groups)
        if self.set_size < 1 or self.sweep_images < 0:
            raise ValueError("set_size must be at least 1 and sweep_images at least 0.")
        if self.budget_minutes is not None and not (math.isfinite(self.budget_minutes) and self.budget_minutes > 0):
            raise ValueError(f"budget_minutes must be a finite number > 0, got {self.budget_minutes}.")
        for phase in (self.distill, self.snn):
            if phase.steps < 0 or phase.batch_size < 1 or phase.lr <= 0:
                raise ValueError("steps must be >= 0, batch size >= 1 and learning rate > 0.")


@dataclass
class CalibrationResult:
    """The calibrated QCFS network (convert it at ``config.timesteps``) and the report of the run."""

    qnet: QCFSUNet2DModel
    report: dict[str, Any]


def calibration_data(
    unet: UNet2DModel,
    scheduler_config: dict,
    config: CalibrationConfig,
    progress: bool,
    on_batch=None,
    conditioning: LabelConditioning | None = None,
) -> torch.Tensor:
    """The x0 pool: the model's own DDIM samples (cached; label by label with ``conditioning``), or the images
    of ``config.image_dir``."""
    if config.image_dir:
        if conditioning is not None:
            raise InputError(
                "An image folder has no labels; a conditional UNet is calibrated on its own samples (leave out the "
                "image folder)."
            )
        return load_image_folder(config.image_dir, unet.config.sample_size, unet.config.in_channels)
    return sample_model_images(
        unet,
        scheduler_config,
        config.num_samples,
        sampler_steps=config.sampler_steps,
        seed=config.seed,
        cache_dir=config.cache_dir,
        progress=progress,
        on_batch=on_batch,
        conditioning=conditioning,
    )


def samples_cached(
    unet: UNet2DModel,
    scheduler_config: dict,
    config: CalibrationConfig,
    conditioning: LabelConditioning | None = None,
) -> bool:
    """Whether the calibration images are at hand without sampling (in the cache, or an image folder)."""
    if config.image_dir:
        return True
    path = sample_cache_path(
        unet, scheduler_config, config.num_samples, config.sampler_steps, config.seed, config.cache_dir, conditioning
    )
    return path.is_file()


def calibrate(
    unet: UNet2DModel,
    scheduler_config: dict,
    config: CalibrationConfig | None = None,
    progress: bool = True,
    checkpoints: CalibrationCheckpoints | None = None,
    label_tokens: LabelTokens | None = None,
) -> CalibrationResult:
    """Quantize ``unet`` and fit the QCFS network (and its SNN at ``config.timesteps``) to reproduce it.

    A class-conditional ``UNet2DModel`` is calibrated on its own samples of every label; a cross-attention
    ``UNet2DConditionModel`` needs its ``label_tokens`` (:class:`~spiking_diffusers.LabelTokens`), and half its
    calibration inputs carry the null token (see :mod:`spiking_diffusers.calibration.conditioning`).

    With ``checkpoints``, each phase saves its state there and a run with ``checkpoints.resume`` continues
    from the last one, to the same result as a run never stopped. With ``progress``, the run is timed and
    estimated first (a line on stderr) and one bar with the ETA follows all phases; ``config.budget_minutes``
    scales the recipe to fit (see :mod:`spiking_diffusers.calibration.cost`), and the report records both.
    """
    bars: list[CalibrationProgress] = []
    try:
        return _calibrate(unet, scheduler_config, config, progress, checkpoints, bars, label_tokens)
    finally:  # an interrupted run's bar goes before its error message, not after it
        for bar in bars:
            bar.close()


def _calibrate(
    unet: UNet2DModel,
    scheduler_config: dict,
    config: CalibrationConfig | None,
    progress: bool,
    checkpoints: CalibrationCheckpoints | None,
    bars: list[CalibrationProgress],
    label_tokens: LabelTokens | None = None,
) -> CalibrationResult:
    config = config or CalibrationConfig()
    config.validate()
    requested = config
    config = dataclasses.replace(
        config,
        residual_spikes=resolve_residual_spikes(config.residual_spikes, unet),
        offsets=resolve_offsets(config.offsets, unet, config.threshold_groups),
    )
    conditioning = label_conditioning(unet, label_tokens)
    fingerprint = run_fingerprint(unet, scheduler_config, config, conditioning)
    saved = checkpoints.start(fingerprint) if checkpoints else None
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    teacher = unet.eval()
    device = next(unet.parameters()).device

    # What the run will cost: timed here, scaled to the budget, shown as one progress bar with an ETA.
    cached = samples_cached(unet, scheduler_config, config, conditioning)
    costs = _unit_costs(teacher, config, progress)
    budget = None
    if config.budget_minutes:
        if saved is not None and saved.plan is not None:  # a resumed run keeps the sizes it started with
            config = apply_plan(config, {key: used for key, (_, used) in saved.plan.items()})
            budget = {"minutes": config.budget_minutes, "changes": saved.plan, "resumed": True}
        else:
            fit = fit_to_budget(config, costs, cached)
            config = fit.config
            message = fit.message(config.budget_minutes)
            budget = {
                "minutes": config.budget_minutes,
                "changes": fit.changes,
                "estimated_seconds": fit.estimate_s,
                "requested_estimated_seconds": fit.requested_estimate_s,
                "fits": fit.fits,
                "message": message,
            }
            _say(message, progress)
        if checkpoints:
            checkpoints.plan = budget["changes"]
    done = _done_units(saved, config)
    phases = plan_phases(config, costs, cached, done) if costs else None
    if phases and progress:
        _say(describe_estimate(phases, costs), progress)
    bar = CalibrationProgress(phases, progress)
    bars.append(bar)
    wall: dict[str, float] = {}

    def timed(name: str, since: float) -> float:
        now = time.perf_counter()
        wall[name] = now - since
        bar.finish(name)
        return now

    tick = time.perf_counter()
    x0 = calibration_data(unet, scheduler_config, config, False, bar.counter("samples"), conditioning)
    tick = timed("samples", tick)
    generator = torch.Generator().manual_seed(config.seed)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    data = NoisedBatches(x0, noise_scheduler, generator, conditioning)

    qnet = quantize(
        unet,
        levels=config.resolved_levels,
        phi=config.phi,
        per_channel=config.per_channel,
        init=None,
        residual_spikes=config.residual_spikes,
        threshold_groups=config.threshold_groups,
        offsets=config.offsets,
        output_precision=config.output_precision,
    )
    qnet.register_to_config(burst=config.resolved_burst)  # what the SNN-aware stage used: conversion's default
    param = next(unet.parameters())
    stats_batches = [
        (x.to(device), t.to(device), move_kwargs(kwargs, param))
        for x, t, kwargs in (data.sample(64) for _ in range(config.stats_batches))
    ]
    inputs_before = collect_site_inputs(qnet, stats_batches, seed=config.seed)
    groups_before = _group_inputs(qnet, stats_batches, config.seed)
    init_thresholds(
        qnet, inputs_before, method=config.threshold_init, percentile=config.percentile, group_inputs=groups_before
    )
    before = _site_report(qnet, inputs_before, groups_before)
    tick = timed("statistics", tick)

    calibration_set = CalibrationSet.draw(x0, noise_scheduler, config.set_size, generator, conditioning)
    if config.needs_labels:
        calibration_set.label(teacher, on_batch=bar.counter("labels"))
    tick = timed("labels", tick)
    sweep = _Sweep(config, teacher, x0, noise_scheduler, conditioning)
    sweep.measure("before", qnet)
    bar.advance("sweep", 1, "noise-prediction error sweep (before)")
    sweep_s = time.perf_counter() - tick

    histories: dict[str, DistillHistory] = dict(saved.finished) if saved else {}

    def phase(name: str) -> dict:
        """The checkpoint, resume and progress arguments of phase ``name``'s :func:`distill`."""
        steps = config.distill.steps if name == "distill" else config.snn.steps
        return {
            "checkpoint": checkpoints.phase(name, dict(histories)) if checkpoints else None,
            "resume": saved.state if saved and saved.phase == name else None,
            "on_step": bar.stepper(name, steps) if phases else None,
        }

    snn = None
    tick = time.perf_counter()
    if config.distill.steps and "distill" not in histories:  # a checkpoint of the snn phase: distill is done
        histories["distill"] = distill(
            qnet, teacher, calibration_set, config.distill, "distill QCFS", progress, **phase("distill")
        )
    tick = timed("distill", tick)
    if config.snn.steps:
        snn = _spiking(qnet, config)
        description = f"fine-tune SNN (T={config.timesteps})"
        histories["snn"] = distill(snn, teacher, calibration_set, config.snn, description, progress, **phase("snn"))
        if config.tsm:
            qnet.enable_tsm(config.timesteps)
        load_snn_weights_into_qcfs(snn, qnet)
    tick = timed("snn", tick)
    filter_report = None
    if config.output_filter:  # fitted on the network that will run: the SNN at T
        fitted = snn if snn is not None else _spiking(qnet, config)
        qnet.set_output_filter(config.output_filter, config.output_filter_groups)
        fitted.set_output_filter(config.output_filter, config.output_filter_groups)
        filter_report = fit_output_filter(fitted, calibration_set, on_batch=bar.counter("filter"))
        qnet.output_filter.load_state_dict(fitted.output_filter.state_dict())
        filter_report["fitted_on"] = f"SNN at T = {config.timesteps}"
    tick = timed("filter", tick)

    after = _site_report(
        qnet,
        collect_site_inputs(qnet, stats_batches, seed=config.seed),
        _group_inputs(qnet, stats_batches, config.seed),
    )
    wall["statistics"] += time.perf_counter() - tick
    tick = time.perf_counter()
    sweep.measure("after", qnet, snn)
    timed("sweep", tick)
    wall["sweep"] += sweep_s
    bar.close()
    report = {
        "settings": _settings(config),
        "calibration_samples": {"count": len(x0), "source": config.image_dir or "model samples (DDIM)"},
        "calibration_set": _set_report(calibration_set, config, noise_scheduler),
        "sites": {name: {"before": before[name], "after": after[name]} for name in before},
        "loss_curves": {phase: h.output_loss for phase, h in histories.items()},
        "output_filter": filter_report,
        "noise_prediction_sweep": sweep.report,
        "phase_wall_time_s": {**wall, **{phase: h.wall_time_s for phase, h in histories.items()}},
        "wall_time_s": time.perf_counter() - start,
    }
    if costs is not None:
        # machine-dependent, like the wall times: "seconds" in the key marks it so (tests/test_determinism.py)
        report["estimated_seconds"] = {
            "unit_costs": asdict(costs),
            "phases": {p.name: p.seconds for p in phases},
            "total": sum(p.seconds for p in phases),
        }
    if budget is not None:
        report["budget"] = budget
        report["requested_settings"] = _settings(requested)
    return CalibrationResult(qnet.eval(), report)


def _spiking(qnet: QCFSUNet2DModel, config: CalibrationConfig) -> SpikingUNet2DModel:
    """The SNN that ``config``'s QCFS network converts into at T (the neurons the recipe calibrates for)."""
    return convert(
        qnet, spike_steps=config.timesteps, neuron=config.neuron, tsm=config.tsm, burst=config.resolved_burst
    )


def resolve_residual_spikes(requested: bool | None, unet: torch.nn.Module) -> bool:
    """Residual spikes as asked for, or by default (``None``) on for a ``UNet2DModel``: with burst neurons they
    cost no quality and cut the SNN's energy below the ANN's on both digits DDPMs (docs/energy.md). A
    ``UNet2DConditionModel`` takes them when asked (``True``) and is calibrated without them by default
    (see docs/conditional.md for what they cost there)."""
    return bool(requested) if requested is not None else type(unet) is UNet2DModel


def resolve_offsets(requested: bool | None, unet: torch.nn.Module, threshold_groups: int = 1) -> bool:
    """Offsets as asked for, or by default (``None``) on for a ``UNet2DModel`` with one threshold per site: on
    both digits DDPMs they add 0.3 to 0.4 dB of paired PSNR at T = 4 for 8 % more energy (docs/calibration.md,
    "SiLU's negative lobe"). Offsets need one threshold group, and a ``UNet2DConditionModel``'s feed-forward
    sites have no weight layer after them to take the offset, so neither gets them by default."""
    if requested is not None:
        return bool(requested)
    return type(unet) is UNet2DModel and int(threshold_groups) == 1


def run_fingerprint(
    unet: UNet2DModel,
    scheduler_config: dict,
    config: CalibrationConfig,
    conditioning: LabelConditioning | None = None,
) -> dict[str, Any]:
    """What a calibration's result depends on: the model (and its label conditioning), its noise schedule and
    every setting but the cache."""
    settings = _settings(config)
    settings.pop("cache_dir")
    if settings["threshold_groups"] == 1:  # as before the setting existed: checkpoints of then still resume
        settings.pop("threshold_groups")
    if settings["output_precision"] == 1:  # likewise
        settings.pop("output_precision")
    if settings["output_filter"] == 0:  # likewise
        settings.pop("output_filter")
        settings.pop("output_filter_groups")
    fingerprint = {"model": model_fingerprint(unet), "noise_schedule": dict(scheduler_config), "settings": settings}
    if conditioning is not None:
        fingerprint["conditioning"] = conditioning.fingerprint
    return fingerprint


def load_snn_weights_into_qcfs(snn: SpikingUNet2DModel, qnet: QCFSUNet2DModel) -> None:
    """Copy a (lambda-form) spiking model's weights and thresholds back into the QCFS network they came from."""
    qnet.unet.load_state_dict(snn.qcfs_state_dict())


def _say(message: str, progress: bool) -> None:
    """A line on stderr that does not break the progress bar (only when progress is shown)."""
    if progress:
        tqdm.write(message, file=sys.stderr)


def _unit_costs(teacher: UNet2DModel, config: CalibrationConfig, progress: bool) -> UnitCosts | None:
    """The unit costs for the estimate (shown with progress) and the budget; ``None`` when neither needs them.

    With a budget under ``accelerate launch`` every process takes the main process's timings, so that all of
    them scale the recipe alike (their training steps meet in every all-reduce).
    """
    if not config.budget_minutes:
        return measure_unit_costs(teacher, config) if progress else None
    if distributed.world_size() == 1:
        return measure_unit_costs(teacher, config)
    device = next(teacher.parameters()).device
    shared = torch.zeros(4, dtype=torch.float64, device=device)
    if distributed.is_main_process():
        costs = measure_unit_costs(teacher, config)
        values = [costs.teacher_s, costs.student_step_s, costs.snn_step_s, costs.channels]
        shared = torch.tensor(values, dtype=torch.float64, device=device)
    distributed.all_reduce_sum([shared])  # the main process's values; the others add zeros
    teacher_s, student_step_s, snn_step_s, channels = shared.tolist()
    return UnitCosts(teacher_s, student_step_s, snn_step_s, round(channels), torch.get_num_threads(), str(device))


def _done_units(saved, config: CalibrationConfig) -> dict[str, int]:
    """Steps a resumed run has already done, per phase."""
    if saved is None:
        return {}
    if saved.phase == "snn":
        return {"distill": config.distill.steps, "snn": saved.state.step}
    return {"distill": saved.state.step}


class _Sweep:
    """The report's noise-prediction error sweep: the QCFS network and its SNN at ``config.timesteps``, before
    and after calibration, against the original model on the same noised calibration images."""

    def __init__(
        self,
        config: CalibrationConfig,
        teacher: UNet2DModel,
        x0: torch.Tensor,
        noise_scheduler,
        conditioning: LabelConditioning | None = None,
    ):
        self.config = config
        self.report: dict[str, Any] = {}
        if not config.sweep_images:
            return
        images = min(config.sweep_images, len(x0))
        self.inputs = sweep_inputs(x0, noise_scheduler, images, config.seed, conditioning)
        self.reference = predict_noise(teacher, self.inputs)
        self.report = {"timesteps": self.inputs.timesteps.tolist(), "images": self.inputs.samples.shape[1]}

    def measure(self, stage: str, qnet: QCFSUNet2DModel, snn: SpikingUNet2DModel | None = None) -> None:
        """Record the errors at ``stage`` ("before" or "after"); ``snn``: the fine-tuned SNN, if there is one."""
        if not self.config.sweep_images:
            return
        config = self.config
        snn = snn or convert(qnet, spike_steps=config.timesteps, neuron=config.neuron, burst=config.resolved_burst)
        self.report[stage] = error_sweep({"qcfs": qnet, "snn": snn}, self.reference, self.inputs)


def _set_report(calibration_set: CalibrationSet, config: CalibrationConfig, noise_scheduler) -> dict[str, Any]:
    """Size and memory of the calibration set."""
    return {
        "size": len(calibration_set),
        "labelled_once": calibration_set.targets is not None,
        "memory_mib": calibration_set.nbytes / 2**20,
    }


def _group_inputs(qnet: QCFSUNet2DModel, batches: list, seed: int) -> list[dict[str, torch.Tensor]] | None:
    """The site inputs per timestep group of a model with threshold tables (``None`` for K = 1)."""
    return collect_group_site_inputs(qnet, batches, seed=seed) if qnet.config.threshold_groups > 1 else None


def _site_report(
    qnet: QCFSUNet2DModel,
    site_inputs: dict[str, torch.Tensor],
    group_inputs: list[dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per site: the threshold(s), their mean, the fraction of inputs above the threshold and the quantization
    error. With K threshold groups, ``threshold`` is the ``K x C`` table (``threshold_group_means`` its row
    means) and the fraction and error are over every group's inputs, each at its group's thresholds."""
    report = {}
    for name, unit in qnet.sites().items():
        lam = unit.threshold.detach().float()
        if lam.dim() == 2:
            parts = [(group, part[name]) for group, part in enumerate(group_inputs or []) if name in part]
            count = sum(values.shape[1] for _, values in parts)
            clipped = sum(_clipped(values, lam[group], unit).sum().item() for group, values in parts)
            report[name] = {
                "threshold": lam.tolist(),
                "threshold_mean": lam.mean().item(),
                "threshold_group_means": lam.mean(1).tolist(),
                "clipped_fraction": clipped / max(1, sum(values.numel() for _, values in parts)),
                "quantization_mse": sum(quantization_error(v, unit, g) * v.shape[1] for g, v in parts) / max(1, count),
            }
            continue
        values = site_inputs[name]
        report[name] = {
            "threshold": lam.tolist() if lam.numel() > 1 else lam.item(),
            "threshold_mean": lam.mean().item(),
            "clipped_fraction": _clipped(values, lam, unit).float().mean().item(),
            "quantization_mse": quantization_error(values, unit),
        }
        if getattr(unit, "output_offset", None) is not None:
            for key, param in (("offset", unit.output_offset), ("shift", unit.input_shift)):
                value = param.detach().float()
                report[name][key] = value.tolist() if value.numel() > 1 else value.item()
    return report


def _clipped(values: torch.Tensor, lam: torch.Tensor, unit: torch.nn.Module) -> torch.Tensor:
    """Where the site's inputs ``(C, n)`` (their magnitudes, for an encoder) exceed the threshold ``lam``."""
    magnitude = values.abs() if isinstance(unit, SignedQCFS) else values
    if getattr(unit, "input_shift", None) is not None:  # the unit clips z - shift
        magnitude = values - unit.input_shift.detach().float().reshape(-1, 1)
    return magnitude > (lam.reshape(-1, 1) if unit.per_channel else lam)


def _settings(config: CalibrationConfig) -> dict[str, Any]:
    settings = asdict(config)
    settings["levels"] = config.resolved_levels
    return settings
