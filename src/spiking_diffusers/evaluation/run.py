"""One evaluation: sample every variant from the same noise and measure it against the real data and the ANN.

Measured for each network (docs/evaluation.md, "Measuring honestly"):

- the Fréchet distance of its samples to the real images (digit-classifier features by default, Inception
  features with a weights file), and its ratio to the ANN's; with ``fd_splits = K`` also over K disjoint
  subsets, whose spread is the seed-to-seed noise a ratio must be read against;
- the PSNR of each sample against the ANN's sample from the same noise (mean and std over images);
- the relative error of its noise prediction against the ANN's on fixed noised real images, at
  timesteps spread over the diffusion schedule (a T-schedule variant at each timestep with the T of the
  sampling run's denoising step nearest to it);
- for a spiking network, its mean T per denoising step (what energy and latency pay; a T schedule's mean);
- for a class- or label-conditional model, sampled with labels in turn at each classifier-free guidance
  scale: the conditional accuracy (the share of samples the shipped digit classifier assigns to their label)
  and its ratio to the ANN's at the same guidance.

The real reference for the digit model is all 1797 digits, not the 359 of the held-out split: the DDPM
was trained on all of them, and a 128-dimensional covariance wants as many samples as there are. The
classifier saw 80 % of them in training; that affects every network alike, so ratios stay fair. For
scale: 800 to 1000 real digits are FD 0.7 to 1.0 from all of them; 1000 DDIM-20 samples of the shipped
ANN about 1.6, and subsets of 250 of them 3.6 to 5.1 (FD is biased upwards at small N).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm.auto import tqdm

from ..calibration.calibrate import CalibrationConfig
from ..calibration.conditioning import label_conditioning
from ..calibration.data import default_cache_dir, load_image_folder
from ..converter.building import spatial_size
from ..digits import load_digit_dataset
from ..label_tokens import LabelTokens
from ..metrics import (
    ConditionalAccuracy,
    DigitFeatures,
    FeatureExtractorError,
    FrechetDistance,
    InceptionFeatures,
    NoisedInputs,
    noise_prediction_errors,
    noised_inputs,
    paired_psnr,
    predict_noise,
    reference_statistics,
)
from ..pipelines import TSchedule, make_scheduler
from .sampling import sample_variant
from .variants import Variant, VariantError, prepare_variants

MIN_FD_SAMPLES = 1000
"""Below this many samples a classifier-feature FD is too noisy to compare networks by (see
"Measuring honestly" in docs/evaluation.md)."""


@dataclass
class EvaluationConfig:
    """Every setting of an evaluation run (all of them go into the report). ``residual_spikes`` is how an ANN
    is quantized (``None``: as ``calibration`` says, else off); a QCFS or spiking model keeps its own, as it
    does its ``threshold_groups`` (K timestep-aware thresholds per site; ``None``: as ``calibration`` says,
    else 1). A conditional model draws image ``i`` with label ``class_labels[i mod count]``, once per
    classifier-free guidance scale in ``guidance_scales``."""

    timesteps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    t_schedules: list[TSchedule | str] = field(default_factory=list)
    levels: int | None = None
    neuron: str | None = None
    execution: str = "batched"
    scheduler: str = "ddim"
    steps: int = 20
    num_images: int = 1000
    batch_size: int = 100
    seed: int = 0
    fd_splits: int = 1
    noise_timesteps: int = 10
    noise_images: int = 64
    inception_weights: str | None = None
    real_images: str | None = None
    grid_rows: int = 8
    cache_dir: str | None = None
    progress: bool = True
    calibration: CalibrationConfig | None = None
    residual_spikes: bool | None = None
    threshold_groups: int | None = None
    class_labels: list[int] | None = None
    guidance_scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class EvaluationResult:
    """The report (JSON-able) and every variant's samples in ``[-1, 1]``, by variant name."""

    report: dict
    samples: dict[str, torch.Tensor]


def evaluate(
    model: nn.Module,
    reference: UNet2DModel | None,
    scheduler_config: dict,
    config: EvaluationConfig,
    label_tokens: LabelTokens | None = None,
) -> EvaluationResult:
    """Evaluate ``model`` (ANN, QCFS or SNN; see :func:`prepare_variants`) as described in the module doc;
    ``label_tokens`` are a label-conditional cross-attention model's class-label encoder."""
    if config.num_images < 2 or config.num_images // max(config.fd_splits, 1) < 2:
        raise ValueError("Every Fréchet distance needs at least 2 images: raise --num-images or lower --fd-splits.")
    for schedule in config.t_schedules:  # a schedule that does not fit the steps fails before any work
        try:
            TSchedule.coerce(schedule, "t_schedules").per_step(config.steps, "the T schedule")
        except ValueError as err:
            raise VariantError(f"{err} (steps: {config.steps})") from err
    shape = _sample_shape(model)  # the metric and its real images first: a mistake there fails before any work
    extractor, extractor_name = _feature_extractor(config, shape)
    real, real_labels, real_name = _real_images(config, shape)
    variants = prepare_variants(
        model,
        reference,
        config.timesteps,
        config.levels,
        config.neuron,
        config.execution,
        scheduler_config,
        config.calibration,
        config.residual_spikes,
        config.t_schedules,
        config.threshold_groups,
        label_tokens,
    )
    device = next(model.parameters()).device
    extractor = extractor.to(device)
    frechet = FrechetDistance(extractor, reference_statistics(extractor, real, config.cache_dir or default_cache_dir()))

    conditioning = label_conditioning(variants[0].unet, label_tokens)
    labels = _sample_labels(config, conditioning)
    accuracy = _accuracy_judge(shape, conditioning, config)
    noise = _noise_prediction_errors(variants, real, real_labels, conditioning, scheduler_config, config)
    samples: dict[str, torch.Tensor] = {}
    rows = []
    for scale in config.guidance_scales:
        group = []
        for variant in variants:
            scheduler = make_scheduler(config.scheduler, scheduler_config)
            images, seconds = sample_variant(
                variant, scheduler, config.num_images, config.steps, config.seed, config.batch_size, config.progress,
                labels, scale, label_tokens,
            )  # fmt: skip
            name = variant.name if len(config.guidance_scales) == 1 else f"{variant.name} w={scale:g}"
            samples[name] = images
            row = _measure(variant, images, group[0]["images"] if group else images, frechet, config)
            row.update(noise[variant.name], name=name, network=variant.name)
            row["guidance_scale"] = scale if labels is not None else None
            row["conditional_accuracy"] = None if accuracy is None else accuracy(images, labels)
            row.update(sampling_seconds=seconds, seconds_per_image=seconds / config.num_images)
            group.append(row | {"images": images})
        rows += [{key: value for key, value in row.items() if key != "images"} for row in group]
        _add_ratios(rows[-len(group) :])
    report = {
        "settings": _settings(config, extractor_name, real_name, len(real), str(device)),
        "noise_timesteps": noise["timesteps"],
        "variants": rows,
        "warnings": _warnings(config, conditioning is not None and accuracy is None),
    }
    return EvaluationResult(report, samples)


def _sample_labels(config: EvaluationConfig, conditioning) -> torch.Tensor | None:
    """The label of every sample (``class_labels`` in turn; every class in turn by default), ``None`` for an
    unconditional model; a :class:`VariantError` for labels or guidance the model cannot take."""
    if conditioning is None:
        if config.class_labels is not None or any(scale != 1 for scale in config.guidance_scales):
            raise VariantError("class labels and classifier-free guidance apply to conditional models only.")
        return None
    if any(scale != 1 for scale in config.guidance_scales) and conditioning.null_label is None:
        raise VariantError("classifier-free guidance needs a null condition: a cross-attention UNet with label tokens.")
    cycle = config.class_labels if config.class_labels is not None else list(range(conditioning.num_classes))
    if not cycle or min(cycle) < 0 or max(cycle) >= conditioning.num_classes:
        raise VariantError(f"class labels must lie in 0..{conditioning.num_classes - 1}, got {cycle}.")
    return torch.tensor([cycle[i % len(cycle)] for i in range(config.num_images)])


def _accuracy_judge(shape: tuple[int, int, int], conditioning, config: EvaluationConfig) -> ConditionalAccuracy | None:
    """The conditional-accuracy metric, where the shipped digit classifier can judge this model's labels."""
    if conditioning is None or config.real_images:
        return None
    judge = ConditionalAccuracy()
    return judge if judge.applies(shape, conditioning.num_classes) else None


def _sample_shape(model: nn.Module) -> tuple[int, int, int]:
    height, width = spatial_size(model.config.sample_size)
    return (int(model.config.in_channels), int(height), int(width))


def _feature_extractor(config: EvaluationConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, str]:
    if config.inception_weights:
        extractor, name = InceptionFeatures(config.inception_weights), "Inception-v3 pool features (2048), true FID"
    else:
        extractor = DigitFeatures()
        name = f"shipped digit classifier, penultimate features ({extractor.num_features})"
    extractor.check_shape(shape)
    return extractor, name


def _real_images(
    config: EvaluationConfig, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The real reference images, their labels where known (the digits), and a description."""
    channels, height, width = shape
    if config.real_images:
        if height != width:
            raise FeatureExtractorError("--real-images supports square sample sizes only.")
        images = load_image_folder(config.real_images, height, channels)
        return images, None, f"images in {Path(config.real_images).resolve()}"
    if channels != 1 or height != width:
        raise FeatureExtractorError(
            f"The built-in real reference is the 1-channel digits; this model makes {'x'.join(map(str, shape))} "
            "images. Pass --real-images DIR with real images of its domain."
        )
    images, labels = load_digit_dataset(size=height, split="all")
    return images, labels, f"scikit-learn digits, all, at {height}x{width}"


def _noise_prediction_errors(
    variants: list[Variant],
    real: torch.Tensor,
    real_labels: torch.Tensor | None,
    conditioning,
    scheduler_config: dict,
    config: EvaluationConfig,
) -> dict:
    """Per variant, the relative noise-prediction error against the ANN at each swept timestep. A conditional
    model sees each real image with its own label where the labels are known and fit, else labels in turn."""
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(config.seed))
    picked = order[: config.noise_images]
    inputs = noised_inputs(
        real[picked], DDPMScheduler.from_config(dict(scheduler_config)), config.noise_timesteps, config.seed
    )
    if conditioning is not None:
        fits = real_labels is not None and int(real_labels.max()) < conditioning.num_classes
        labels = real_labels[picked] if fits else conditioning.pool_labels(len(picked))
        inputs.conditions = conditioning.kwargs(labels)
    out: dict = {"timesteps": inputs.timesteps.tolist()}
    reference = None
    for variant in tqdm(variants, desc="noise-prediction sweep", disable=not config.progress, leave=False):
        if variant.t_schedule is None:
            predictions = predict_noise(variant.unet, inputs, config.batch_size, **variant.forward_kwargs)
            steps = None
        else:
            predictions, steps = _predict_noise_scheduled(variant, inputs, scheduler_config, config)
        if reference is None:  # the ANN comes first
            reference = predictions
            out[variant.name] = {"noise_error": None, "noise_error_mean": None}
            continue
        errors = noise_prediction_errors(predictions, reference)
        out[variant.name] = {"noise_error": errors, "noise_error_mean": float(np.mean(errors))}
        if steps is not None:
            out[variant.name]["noise_error_snn_timesteps"] = steps
    return out


def _predict_noise_scheduled(
    variant: Variant, inputs: NoisedInputs, scheduler_config: dict, config: EvaluationConfig
) -> tuple[torch.Tensor, list[int]]:
    """A T-schedule variant's noise predictions, each sweep timestep at the T of the sampling run's denoising
    step nearest to it; and those T."""
    scheduler = make_scheduler(config.scheduler, scheduler_config)
    scheduler.set_timesteps(config.steps)
    steps = variant.t_schedule.at_timesteps(inputs.timesteps.tolist(), scheduler.timesteps.tolist(), config.steps)
    predictions = [
        predict_noise(
            variant.unet,
            NoisedInputs(inputs.samples[k : k + 1], inputs.timesteps[k : k + 1]),
            config.batch_size,
            spike_steps=t,
        )
        for k, t in enumerate(steps)
    ]
    return torch.cat(predictions), steps


def _measure(
    variant: Variant, images: torch.Tensor, ann_images: torch.Tensor, frechet: FrechetDistance, config: EvaluationConfig
) -> dict:
    row = {"name": variant.name, "kind": variant.kind, "levels": variant.levels, "timesteps": variant.t_label}
    row["mean_timesteps"] = variant.mean_timesteps(config.steps)
    row["fd"] = frechet(images)
    splits = max(config.fd_splits, 1)
    size = len(images) // splits
    row["fd_splits"] = [frechet(images[k * size : (k + 1) * size]) for k in range(splits)] if splits > 1 else None
    if variant.kind == "ann":
        row["psnr_mean"] = row["psnr_std"] = None
    else:
        psnr = paired_psnr(images, ann_images)
        row["psnr_mean"], row["psnr_std"] = float(psnr.mean()), float(psnr.std()) if len(psnr) > 1 else 0.0
    return row


def _add_ratios(rows: list[dict]) -> None:
    """FD / FD(ANN) on the whole set and per split (paired: split k of each network used the same noise), and
    conditional accuracy / the ANN's, against the ANN row that leads ``rows`` (the same guidance)."""
    ann = rows[0]
    for row in rows:
        row["fd_ratio"] = row["fd"] / ann["fd"]
        accuracy, ann_accuracy = row.get("conditional_accuracy"), ann.get("conditional_accuracy")
        row["accuracy_ratio"] = accuracy / ann_accuracy if accuracy is not None and ann_accuracy else None
        row["fd_split_mean"] = row["fd_split_std"] = row["fd_ratio_split_mean"] = row["fd_ratio_split_std"] = None
        if row["fd_splits"]:
            fds = np.asarray(row["fd_splits"])
            ratios = fds / np.asarray(ann["fd_splits"])
            row["fd_split_mean"], row["fd_split_std"] = float(fds.mean()), float(fds.std(ddof=1))
            row["fd_ratio_split_mean"], row["fd_ratio_split_std"] = float(ratios.mean()), float(ratios.std(ddof=1))


def _settings(config: EvaluationConfig, extractor: str, real: str, num_real: int, device: str) -> dict:
    settings = {k: v for k, v in vars(config).items() if k not in ("progress", "cache_dir")}
    settings["t_schedules"] = [str(TSchedule.coerce(schedule)) for schedule in config.t_schedules]
    settings["calibration"] = dataclasses.asdict(config.calibration) if config.calibration else None
    settings.update(feature_extractor=extractor, real_reference=real, real_reference_images=num_real, device=device)
    return settings


def _warnings(config: EvaluationConfig, accuracy_missing: bool = False) -> list[str]:
    warnings = []
    if accuracy_missing:
        warnings.append(
            "No conditional accuracy: the shipped digit classifier judges 1x16x16 samples of 10-class models "
            "against the built-in digits only."
        )
    if config.num_images < MIN_FD_SAMPLES:
        warnings.append(
            f"FD from {config.num_images} < {MIN_FD_SAMPLES} samples is noisy and biased upwards; compare networks "
            "by the paired ratio and its split spread, not by absolute values."
        )
    if config.scheduler in ("ddpm", "euler-a"):
        warnings.append(
            f"{config.scheduler} is stochastic: paired PSNR then also measures diverging step noise paths; "
            "use ddim for a deterministic comparison."
        )
    return warnings
