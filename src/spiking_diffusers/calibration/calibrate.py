"""The calibration recipe: data-free inputs, threshold initialisation, distillation of the QCFS network,
then fine-tuning of the spiking network itself at its target T. One code path for ``sdm-calibrate`` and
for the default calibration that ``sdm-convert`` runs on an uncalibrated model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..converter import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from ..converter.encoders import SignedQCFS
from ..converter.thresholds import (
    collect_group_site_inputs,
    collect_site_inputs,
    init_thresholds,
    quantization_error,
)
from ..validation import check_int
from .checkpoint import CalibrationCheckpoints
from .data import NoisedBatches, load_image_folder, model_fingerprint, sample_model_images
from .distill import DistillHistory, DistillSettings, distill


@dataclass
class CalibrationConfig:
    """Every knob of a calibration run (all of them go into the report). ``residual_spikes`` quantizes with
    signed input encoders on the residual-reading convolutions and the attention projections (see ``quantize``),
    calibrated with the rest. ``threshold_groups`` K > 1 gives every site a table of K thresholds, one per equal
    range of the diffusion schedule (timestep-aware thresholds), each initialised from the calibration inputs in
    its range and then trained with the rest. ``offsets`` gives every activation unit an input shift and an
    output offset, initialised with its threshold and trained with the thresholds."""

    timesteps: int = 4
    levels: int | None = None
    per_channel: bool = True
    phi: float = 0.5
    neuron: str = "if"
    tsm: bool = False
    residual_spikes: bool = False
    threshold_groups: int = 1
    offsets: bool = False
    threshold_init: str = "mse"
    percentile: float = 99.9
    num_samples: int = 512
    sampler_steps: int = 20
    image_dir: str | None = None
    stats_batches: int = 4
    distill: DistillSettings = field(default_factory=lambda: DistillSettings(steps=2000, batch_size=32, lr=1e-3))
    snn: DistillSettings = field(default_factory=lambda: DistillSettings(steps=100, batch_size=16, lr=1e-4))
    seed: int = 0
    cache_dir: str | None = None

    @property
    def resolved_levels(self) -> int:
        """The QCFS levels L: ``levels``, or T (``timesteps``) when it is not set."""
        return int(self.levels or self.timesteps)

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no calibration can run with."""
        if self.timesteps < 1 or self.resolved_levels < 1:
            raise ValueError("timesteps and levels must be at least 1.")
        if self.num_samples < 1:
            raise ValueError("num_samples must be at least 1.")
        check_int(self.threshold_groups, "threshold_groups", "threshold_groups")
        for phase in (self.distill, self.snn):
            if phase.steps < 0 or phase.batch_size < 1 or phase.lr <= 0:
                raise ValueError("steps must be >= 0, batch size >= 1 and learning rate > 0.")


@dataclass
class CalibrationResult:
    """The calibrated QCFS network (convert it at ``config.timesteps``) and the report of the run."""

    qnet: QCFSUNet2DModel
    report: dict[str, Any]


def calibration_data(
    unet: UNet2DModel, scheduler_config: dict, config: CalibrationConfig, progress: bool
) -> torch.Tensor:
    """The x0 pool: the model's own DDIM samples (cached), or the images of ``config.image_dir``."""
    if config.image_dir:
        return load_image_folder(config.image_dir, unet.config.sample_size, unet.config.in_channels)
    return sample_model_images(
        unet,
        scheduler_config,
        config.num_samples,
        sampler_steps=config.sampler_steps,
        seed=config.seed,
        cache_dir=config.cache_dir,
        progress=progress,
    )


def calibrate(
    unet: UNet2DModel,
    scheduler_config: dict,
    config: CalibrationConfig | None = None,
    progress: bool = True,
    checkpoints: CalibrationCheckpoints | None = None,
) -> CalibrationResult:
    """Quantize ``unet`` and fit the QCFS network (and its SNN at ``config.timesteps``) to reproduce it.

    With ``checkpoints``, each phase saves its state there and a run with ``checkpoints.resume`` continues
    from the last one, to the same result as a run never stopped.
    """
    config = config or CalibrationConfig()
    config.validate()
    saved = checkpoints.start(run_fingerprint(unet, scheduler_config, config)) if checkpoints else None
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    teacher = unet.eval()
    device = next(unet.parameters()).device
    x0 = calibration_data(unet, scheduler_config, config, progress)
    generator = torch.Generator().manual_seed(config.seed)
    data = NoisedBatches(x0, DDPMScheduler.from_config(scheduler_config), generator)

    qnet = quantize(
        unet,
        levels=config.resolved_levels,
        phi=config.phi,
        per_channel=config.per_channel,
        init=None,
        residual_spikes=config.residual_spikes,
        threshold_groups=config.threshold_groups,
        offsets=config.offsets,
    )
    stats_batches = [
        (x.to(device), t.to(device), {}) for x, t in (data.sample(64) for _ in range(config.stats_batches))
    ]
    inputs_before = collect_site_inputs(qnet, stats_batches, seed=config.seed)
    groups_before = _group_inputs(qnet, stats_batches, config.seed)
    init_thresholds(
        qnet, inputs_before, method=config.threshold_init, percentile=config.percentile, group_inputs=groups_before
    )
    before = _site_report(qnet, inputs_before, groups_before)

    histories: dict[str, DistillHistory] = dict(saved.finished) if saved else {}

    def phase(name: str) -> dict:
        """The checkpoint and resume arguments of phase ``name``'s :func:`distill`."""
        return {
            "checkpoint": checkpoints.phase(name, dict(histories)) if checkpoints else None,
            "resume": saved.state if saved and saved.phase == name else None,
        }

    if config.distill.steps and "distill" not in histories:  # a checkpoint of the snn phase: distill is done
        histories["distill"] = distill(
            qnet, teacher, data, config.distill, "distill QCFS", progress, **phase("distill")
        )
    if config.snn.steps:
        snn = convert(qnet, timesteps=config.timesteps, neuron=config.neuron, tsm=config.tsm)
        description = f"fine-tune SNN (T={config.timesteps})"
        histories["snn"] = distill(snn, teacher, data, config.snn, description, progress, **phase("snn"))
        if config.tsm:
            qnet.enable_tsm(config.timesteps)
        load_snn_weights_into_qcfs(snn, qnet)

    after = _site_report(
        qnet,
        collect_site_inputs(qnet, stats_batches, seed=config.seed),
        _group_inputs(qnet, stats_batches, config.seed),
    )
    report = {
        "settings": _settings(config),
        "calibration_samples": {"count": len(x0), "source": config.image_dir or "model samples (DDIM)"},
        "sites": {name: {"before": before[name], "after": after[name]} for name in before},
        "loss_curves": {phase: h.output_loss for phase, h in histories.items()},
        "phase_wall_time_s": {phase: h.wall_time_s for phase, h in histories.items()},
        "wall_time_s": time.perf_counter() - start,
    }
    return CalibrationResult(qnet.eval(), report)


def run_fingerprint(unet: UNet2DModel, scheduler_config: dict, config: CalibrationConfig) -> dict[str, Any]:
    """What a calibration's result depends on: the model, its noise schedule and every setting but the cache."""
    settings = _settings(config)
    settings.pop("cache_dir")
    if settings["threshold_groups"] == 1:  # as before the setting existed: checkpoints of then still resume
        settings.pop("threshold_groups")
    return {"model": model_fingerprint(unet), "noise_schedule": dict(scheduler_config), "settings": settings}


def load_snn_weights_into_qcfs(snn: SpikingUNet2DModel, qnet: QCFSUNet2DModel) -> None:
    """Copy a (lambda-form) spiking model's weights and thresholds back into the QCFS network they came from."""
    qnet.unet.load_state_dict(snn.qcfs_state_dict())


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
