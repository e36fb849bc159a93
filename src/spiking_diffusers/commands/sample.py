"""``sdm-sample``: images from an ANN, QCFS or spiking diffusion model with any diffusers scheduler, and
threshold-guidance sweeps.

Image ``i`` always starts from its own generator seeded ``seed + i``, so the images do not depend on the
batch size (nor, under ``accelerate launch``, on the number of processes), and every threshold scale of a
sweep denoises exactly the same noise: each scale's images are compared with the scale-1 images from the
same noise (paired PSNR), and, where a Fréchet-distance metric is available, scored by it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..calibration.data import default_cache_dir
from ..cli import (
    BoundedInt,
    CommandError,
    FiniteFloat,
    TScheduleParam,
    atomic_directory,
    check_guidance,
    check_output,
    check_scheduler_steps,
    check_t_schedule,
    class_labels_option,
    device_option,
    get_device,
    model_option,
    output_options,
    parse_float_list,
    resolve_class_labels,
    sdm_command,
)
from ..digits import load_digit_images
from ..distributed import gather_batches, is_main_process, my_batches
from ..loading import load_model
from ..metrics import DigitFeatures, FeatureExtractorError, FrechetDistance, paired_psnr, reference_statistics
from ..pipelines import GROUPS, SCHEDULERS, SpikingDiffusionPipeline, make_scheduler, step_accepts
from ..pipelines.threshold_guidance import ThresholdScale, group_scales, is_identity

FD_DESCRIPTION = "Fréchet distance, shipped digit-classifier features, to all scikit-learn digits"

EXAMPLES = """
\b
Examples:
  sdm-sample --output samples                                    # the shipped digits ANN, DDIM 50 steps
  sdm-sample --model digits-snn --scheduler dpm++ --steps 20 --num-images 64 --output snn-samples
  sdm-sample --model digits-snn --threshold-scale 0.99,0.995,1.0,1.005 --output sweep   # threshold guidance
  sdm-sample --model digits-snn --threshold-scale down=0.99,up=0.995 --snn-timesteps 8 --output grouped
  sdm-sample --model digits-snn --steps 20 --snn-timesteps 4,16x3 --output scheduled   # T schedule: mean T 5.8
  sdm-sample --model digits-conditional-snn --class-labels 3,7 --guidance-scale 1.5 --output threes-and-sevens
"""


def parse_threshold_scales(values: tuple[str, ...]) -> list[ThresholdScale]:
    """``--threshold-scale`` occurrences -> settings: ``0.99,1.0`` gives two global factors, ``down=0.99,up=1``
    one per-group setting."""
    settings: list[ThresholdScale] = []
    for value in values:
        if "=" not in value:
            settings.extend(parse_float_list(value, "--threshold-scale"))
            continue
        scale: dict[str, float] = {}
        for item in (item.strip() for item in value.split(",")):
            group, equals, number = (part.strip() for part in item.partition("="))
            if not equals or not group:
                raise click.BadParameter(
                    f"{value!r}: in the GROUP=S form every item names its group ({', '.join(GROUPS)}), and "
                    f"{item!r} does not; give a sweep of several settings as one --threshold-scale each.",
                    param_hint="--threshold-scale",
                )
            if group in scale:
                raise click.BadParameter(
                    f"{value!r} sets group {group} twice; give each group once per setting.",
                    param_hint="--threshold-scale",
                )
            numbers = parse_float_list(number, "--threshold-scale")
            if len(numbers) != 1:
                raise click.BadParameter(f"{item!r}: a group takes one number.", param_hint="--threshold-scale")
            scale[group] = numbers[0]
        try:
            group_scales(scale)
        except ValueError as err:
            raise click.BadParameter(f"{err} Got {value!r}.", param_hint="--threshold-scale") from err
        settings.append(scale)
    return settings


def scale_label(scale: ThresholdScale) -> str:
    """A short name of a setting: ``0.99`` or ``down=0.99,up=1``."""
    if isinstance(scale, dict):
        return ",".join(f"{group}={scale[group]:g}" for group in GROUPS if group in scale)
    return f"{scale:g}"


def frechet_distance_metric(image_shape: tuple[int, ...]) -> Callable[[torch.Tensor], float] | None:
    """The sweep's quality metric, or ``None`` where there is none for these images.

    The one place where ``sdm-sample`` plugs into :mod:`spiking_diffusers.metrics`: the Fréchet distance on
    the shipped digit classifier's features to all scikit-learn digits (as ``sdm-eval`` measures it), for
    1x16x16 images ``(N, C, H, W)`` in [-1, 1]. Other image shapes have no built-in real reference.
    """
    extractor = DigitFeatures()
    try:
        extractor.check_shape(tuple(image_shape))
    except FeatureExtractorError:
        return None
    real = load_digit_images(size=image_shape[-1], split="all")
    return FrechetDistance(extractor, reference_statistics(extractor, real, default_cache_dir()))


def mean_paired_psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the PSNR (dB; [0, 1] images) of each image against the reference from the same noise.

    Identical images count as 100 dB rather than infinity, so one unchanged image does not swamp the mean.
    """
    psnr = paired_psnr(torch.from_numpy(images), torch.from_numpy(reference), data_range=1.0)
    return float(psnr.clamp(max=100.0).mean())


def save_images(images: np.ndarray, directory: Path, columns: int | None = None) -> None:
    """Each image as ``00000.png``... and all of them as ``grid.png`` (tiles enlarged to at least 64 px;
    ``columns`` per row, else a square grid)."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels = (images * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(directory / f"{i:05d}.png")
    count, height, width = pixels.shape[:3]
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + 2) + 2, columns * (width + 2) + 2, *pixels.shape[3:]), dtype=np.uint8)
    for i, image in enumerate(pixels):
        top, left = 2 + (i // columns) * (height + 2), 2 + (i % columns) * (width + 2)
        grid[top : top + height, left : left + width] = image
    zoom = max(1, 64 // max(height, width))
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(
        directory / "grid.png"
    )


def generate(
    pipe: SpikingDiffusionPipeline,
    num_images: int,
    batch_size: int,
    seed: int,
    progress: tqdm,
    class_labels: list[int] | None = None,
    **call_kwargs,
) -> np.ndarray:
    """``num_images`` images (N, H, W, C in [0, 1]), image ``i`` from a generator seeded ``seed + i`` (and, for
    a conditional model, with label ``class_labels[i mod count]``).

    Under ``accelerate launch`` each process samples its share of the batches and every process gets all
    images back: the same images as one process makes (see :mod:`spiking_diffusers.distributed`).
    """
    batches = []
    for indices in my_batches(num_images, batch_size):
        generators = [torch.Generator().manual_seed(seed + i) for i in indices]
        if class_labels is not None:
            call_kwargs["class_labels"] = torch.tensor([class_labels[i % len(class_labels)] for i in indices])
        images = pipe(batch_size=len(indices), generator=generators, output_type="np", **call_kwargs).images
        batches.append(torch.from_numpy(images))
        progress.update(len(indices))
    return gather_batches(batches, num_images, batch_size).numpy()


@sdm_command("sdm-sample", epilog=EXAMPLES)
@model_option("Hub id or local directory of an ANN, QCFS or spiking model (either layout); default: the digits "
              "DDPM shipped in the package (an ANN).")  # fmt: skip
@output_options("Directory for the PNGs, grid.png and sweep.json.")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="ddim", help="Sampler.")
@click.option("--steps", default=50, type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--num-images", "-n", default=16, type=BoundedInt("num_images"), help="Images per threshold scale.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1), help="Images per UNet call.")
@click.option("--seed", default=0, type=BoundedInt("seed"), help="Image i starts from a generator seeded seed + i.")
@click.option(
    "--threshold-scale",
    "threshold_scales",
    multiple=True,
    metavar="S[,S...] | GROUP=S[,...]",
    help="Threshold guidance (spiking models): a factor on every firing threshold; several values make a "
    "sweep over the same noise (scale 1 is added as the reference). GROUP=S sets block groups "
    f"({', '.join(GROUPS)}). Repeatable.",
)
@click.option(
    "--spike-steps",
    "--snn-timesteps",
    "-T",
    "snn_timesteps",
    default=None,
    type=TScheduleParam(),
    metavar="T | SCHEDULE",
    help="SNN time steps T per denoising step [default: model's], or a T schedule: 4,16x3 is T = 16 for the last "
    "3 steps and 4 for the others; TxK items whose counts add up to --steps give every step (8x10,16x10).",
)
@click.option("--eta", default=0.0, type=FiniteFloat(0, 1), help="Noise of DDIM-type samplers (ddim only).")
@class_labels_option()
@click.option(
    "--guidance-scale",
    default=1.0,
    type=FiniteFloat(0),
    help="Classifier-free guidance of a label-conditional model (1: none).",
)
@device_option()
def main(
    model,
    output,
    overwrite,
    scheduler,
    steps,
    num_images,
    batch_size,
    seed,
    threshold_scales,
    snn_timesteps,
    eta,
    class_labels,
    guidance_scale,
    device,
) -> None:
    """Sample images from a diffusion model (ANN, QCFS or spiking), optionally sweeping threshold guidance."""
    check_output(output, overwrite, {"--model": model})
    mean_timesteps = check_t_schedule(snn_timesteps, steps, "--spike-steps")
    if getattr(snn_timesteps, "constant_timesteps", None) is not None:
        snn_timesteps = snn_timesteps.constant_timesteps  # "2x3" over 3 steps is T = 2
    settings = _sweep_settings(parse_threshold_scales(threshold_scales))
    device = get_device(device)
    with atomic_directory(output, overwrite=overwrite) as staging:
        loaded = load_model(model, device)
        if loaded.kind != "snn" and (snn_timesteps is not None or threshold_scales):
            raise CommandError(
                f"--threshold-scale and --snn-timesteps apply to spiking models; {loaded.source} is "
                f"{'a QCFS model' if loaded.kind == 'qcfs' else 'an ANN'}.",
                exit_code=2,
            )
        labels = resolve_class_labels(class_labels, loaded)
        check_guidance([guidance_scale], loaded)
        pipe = SpikingDiffusionPipeline(
            unet=loaded.unet,
            scheduler=make_scheduler(scheduler, loaded.scheduler.config),
            label_tokens=loaded.label_tokens,
        )
        check_scheduler_steps(pipe.scheduler, steps, "--steps")
        if eta and not step_accepts(pipe.scheduler, "eta"):
            raise CommandError(f"--eta applies to the ddim scheduler, not to {scheduler}.", exit_code=2)
        pipe.set_progress_bar_config(leave=False, desc="denoising", disable=not is_main_process())
        results = []
        share = sum(map(len, my_batches(num_images, batch_size)))  # this process's images per setting
        with tqdm(total=share * len(settings), desc="images", unit="img", disable=not is_main_process()) as progress:
            for scale in settings:
                images = generate(
                    pipe, num_images, batch_size, seed, progress, labels,
                    num_inference_steps=steps, eta=eta, threshold_scale=scale, spike_steps=snn_timesteps,
                    **({"guidance_scale": guidance_scale} if guidance_scale != 1 else {}),
                )  # fmt: skip
                subdir = f"scale-{scale_label(scale)}" if len(settings) > 1 else "."
                save_images(images, Path(staging) / subdir, len(labels) if labels else None)
                results.append({"scale": scale, "dir": subdir, "images": images})
        if loaded.kind == "snn" and snn_timesteps is None:
            snn_timesteps = mean_timesteps = int(loaded.unet.config.timesteps)
        if len(settings) > 1:
            sweep = _score_sweep(results) | {
                "model": loaded.source, "scheduler": scheduler, "steps": steps, "num_images": num_images,
                "seed": seed, "snn_timesteps": _json_t(snn_timesteps), "mean_snn_timesteps": mean_timesteps,
                "eta": eta, "class_labels": labels, "guidance_scale": guidance_scale,
            }  # fmt: skip
            (Path(staging) / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    if len(settings) > 1:
        _print_sweep(sweep)
    kind = loaded.kind.upper()
    if loaded.kind == "snn":
        kind += f", T = {snn_timesteps}, mean T {mean_timesteps:g} per denoising step"
    if labels is not None:
        kind += f", labels {','.join(map(str, labels))} in turn" + (
            f", guidance {guidance_scale:g}" if guidance_scale != 1 else ""
        )
    click.echo(f"Wrote {num_images * len(settings)} images ({kind}, {scheduler}, {steps} steps) to {output}")


def _json_t(snn_timesteps) -> int | str:
    """T as JSON: an int, or a schedule's text form (``"4,16x3"``)."""
    return snn_timesteps if isinstance(snn_timesteps, int) else str(snn_timesteps)


def _sweep_settings(settings: list[ThresholdScale]) -> list[ThresholdScale]:
    """The settings to sample: ``[None]`` without ``--threshold-scale``; a sweep always includes scale 1."""
    if not settings:
        return [None]
    unique = list({scale_label(s): s for s in settings}.values())
    if len(unique) > 1 and not any(is_identity(s) for s in unique):
        unique.insert(0, 1.0)
    return unique


def _score_sweep(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired PSNR of every setting against scale 1, the Fréchet distance where available, and the best."""
    reference = next(r for r in results if is_identity(r["scale"]))
    images = reference["images"]  # (N, H, W, C) in [0, 1]
    count, height, width, channels = images.shape
    metric = frechet_distance_metric((channels, height, width)) if count >= 2 else None
    rows = []
    for result in results:
        tensor = torch.from_numpy(result["images"]).permute(0, 3, 1, 2) * 2 - 1
        rows.append(
            {
                "threshold_scale": result["scale"],
                "label": scale_label(result["scale"]),
                "dir": result["dir"],
                "psnr_vs_scale_1_db": None if result is reference else mean_paired_psnr(result["images"], images),
                "frechet_distance": None if metric is None else metric(tensor),
            }
        )
    best = None if metric is None else min(rows, key=lambda row: row["frechet_distance"])["label"]
    return {
        "reference": scale_label(reference["scale"]),
        "metric": None if metric is None else FD_DESCRIPTION,
        "results": rows,
        "best": best,
    }


def _print_sweep(sweep: dict[str, Any]) -> None:
    click.echo(f"{'threshold scale':<24} {'PSNR vs scale 1 (dB)':>21} {'Fréchet distance':>17}")
    for row in sweep["results"]:
        psnr = "reference" if row["psnr_vs_scale_1_db"] is None else f"{row['psnr_vs_scale_1_db']:.2f}"
        fd = "-" if row["frechet_distance"] is None else f"{row['frechet_distance']:.3f}"
        click.echo(f"{row['label']:<24} {psnr:>21} {fd:>17}")
    if sweep["best"] is not None:
        click.echo(f"Best threshold scale (lowest Fréchet distance): {sweep['best']}")
        if sweep["num_images"] < 1000:
            click.echo(f"  note: on {sweep['num_images']} images the Fréchet distance is noisy; use >= 1000 to rank.")
    else:
        click.echo(
            "Best threshold scale: n/a; no Fréchet-distance metric for these images (PSNR vs scale 1 measures "
            "how far a scale moves the samples, not their quality)."
        )
