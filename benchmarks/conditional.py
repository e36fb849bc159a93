"""The label-conditional digits model as an SNN: quality, conditional accuracy and energy against its ANN.

For each T in ``--spike-steps`` the ANN (a ``UNet2DConditionModel`` with ``LabelTokens``) is calibrated with
the default recipe at T (timed; ``calibrate(..., label_tokens=...)``) and converted. Then the ANN and every SNN
sample the same noises (per-image generators, labels 0..9 in turn, DDIM, eta 0) at each guidance scale of
``--guidance`` (classifier-free guidance against the null token). Printed per row: FD to the real digits and its
ratio to the ANN's, paired PSNR against the ANN, conditional accuracy (the share of samples the shipped
classifier assigns to the requested label) and its ratio to the ANN's, and the SNN / ANN energy and
spike-driven share of a counted sampling run with the same guidance.

    OMP_NUM_THREADS=2 python benchmarks/conditional.py [--model DIR] [--spike-steps 4,8] [--guidance 1,3]
                                                       [--num-images 1000] [--grid PATH] [--save-dir DIR]
                                                       [--residual-spikes]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

import spiking_diffusers as sdm
from spiking_diffusers.converter import QCFSUNet2DConditionModel
from spiking_diffusers.digits import (
    SHIPPED_CONDITIONAL_PATH,
    load_digit_images,
)
from spiking_diffusers.energy.measure import measure_energy
from spiking_diffusers.evaluation.report import save_grid
from spiking_diffusers.metrics import (
    ConditionalAccuracy,
    DigitFeatures,
    FrechetDistance,
    ReferenceStatistics,
    paired_psnr,
)


def sample(pipe, unet, labels: torch.Tensor, guidance: float, steps: int, batch_size: int) -> torch.Tensor:
    """Images in [-1, 1] of ``labels`` (image ``i`` from generator seed ``i``) with ``unet`` in ``pipe``."""
    sampler = sdm.SpikingDiffusionPipeline(unet=unet, scheduler=pipe.scheduler, label_tokens=pipe.label_tokens)
    sampler.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images = sampler(
            batch_size=len(chunk), generator=generators, num_inference_steps=steps, output_type="pt",
            class_labels=chunk, guidance_scale=guidance,
        ).images  # fmt: skip
        out.append(images * 2 - 1)
    return torch.cat(out)


def calibrated(
    pipe, T: int, save_dir: str | None, residual_spikes: bool = False
) -> tuple[QCFSUNet2DConditionModel, float]:
    """The QCFS network of the default recipe at T (with residual spikes if asked; reused from ``save_dir`` when
    saved there) and its seconds."""
    name = f"conditional-qcfs-T{T}" + ("-residual" if residual_spikes else "")
    saved = Path(save_dir) / name if save_dir else None
    if saved is not None and (saved / "calibration_seconds.json").is_file():
        seconds = json.loads((saved / "calibration_seconds.json").read_text())["seconds"]
        return QCFSUNet2DConditionModel.from_pretrained(saved).eval(), seconds
    start = time.perf_counter()
    config = sdm.CalibrationConfig(timesteps=T, residual_spikes=residual_spikes)
    result = sdm.calibrate(
        pipe.unet, dict(pipe.scheduler.config), config, progress=False, label_tokens=pipe.label_tokens
    )
    seconds = time.perf_counter() - start
    if saved is not None:
        result.qnet.save_pretrained(saved)
        (saved / "calibration_seconds.json").write_text(json.dumps({"seconds": seconds}))
    return result.qnet, seconds


@click.command(context_settings={"show_default": True})
@click.option(
    "--model", default=SHIPPED_CONDITIONAL_PATH, help="The conditional pipeline directory (unet + label_tokens)."
)
@click.option("--spike-steps", default="4,8", help="SNN time steps T, comma-separated.")
@click.option("--guidance", default="1,3", help="Guidance scales, comma-separated (1: none).")
@click.option("--num-images", default=1000, help="Samples per network and guidance (labels 0..9 in turn).")
@click.option("--steps", default=20, help="DDIM steps.")
@click.option("--batch-size", default=100)
@click.option("--save-dir", default=None, help="Save (and reuse) the calibrated QCFS networks here.")
@click.option("--residual-spikes", is_flag=True, help="Calibrate with residual spikes (spike-fed projections).")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Save a class x network grid here.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON here.")
def main(model, spike_steps, guidance, num_images, steps, batch_size, save_dir, residual_spikes, grid, output) -> None:
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.eval()
    features = DigitFeatures()
    fd = FrechetDistance(features, ReferenceStatistics.from_images(features, load_digit_images(16, "all")))
    labels = torch.arange(num_images) % 10
    Ts = [int(t) for t in spike_steps.split(",")]
    snns = {}
    for T in Ts:
        qnet, seconds = calibrated(pipe, T, save_dir, residual_spikes)
        snns[T] = (sdm.convert(qnet, spike_steps=T), seconds)
        click.echo(f"calibrated at T = {T} in {seconds:.0f} s on {torch.get_num_threads()} thread(s)", err=True)

    judge = ConditionalAccuracy()

    def accuracy(images: torch.Tensor) -> float:
        return judge(images, labels)

    rows, pictures = [], {}
    for scale in (float(g) for g in guidance.split(",")):
        ann = sample(pipe, pipe.unet, labels, scale, steps, batch_size)
        ann_fd, ann_acc = fd(ann), accuracy(ann)
        rows.append({"network": "ANN", "guidance": scale, "fd": ann_fd, "accuracy": ann_acc})
        pictures[f"ANN w={scale:g}"] = ann
        for T, (snn, seconds) in snns.items():
            images = sample(pipe, snn, labels, scale, steps, batch_size)
            energy = measure_energy(
                snn, pipe.unet, pipe.scheduler, steps, num_images=2, label_tokens=pipe.label_tokens,
                guidance_scale=scale,
            ).totals()  # fmt: skip
            snn_fd, snn_acc = fd(images), accuracy(images)
            rows.append({
                "network": f"SNN T={T}", "guidance": scale, "fd": snn_fd, "fd_ratio": snn_fd / ann_fd,
                "psnr": paired_psnr(images, ann).mean().item(), "accuracy": snn_acc,
                "accuracy_ratio": snn_acc / ann_acc, "energy_ratio": energy["energy_ratio_snn_over_ann"],
                "spike_driven": energy["spike_driven_fraction"], "calibration_s": seconds,
            })  # fmt: skip
            pictures[f"SNN T={T} w={scale:g}"] = images
            click.echo(json.dumps(rows[-1]), err=True)
        if output:
            Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    click.echo(f"\n{num_images} samples per row (labels 0..9 in turn), DDIM-{steps}, same noise for every network\n")
    click.echo("| network | guidance | FD | FD ratio | PSNR dB | conditional accuracy | acc. ratio | SNN/ANN energy "
               "| spike-driven | calibration s |")  # fmt: skip
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        snn = "fd_ratio" in r
        click.echo(
            f"| {r['network']} | {r['guidance']:g} | {r['fd']:.2f} | {r['fd_ratio']:.2f} | {r['psnr']:.1f} "
            f"| {r['accuracy']:.3f} | {r['accuracy_ratio']:.3f} | {r['energy_ratio']:.2f} | {r['spike_driven']:.1%} "
            f"| {r['calibration_s']:.0f} |"
            if snn
            else f"| {r['network']} | {r['guidance']:g} | {r['fd']:.2f} | 1 | - | {r['accuracy']:.3f} | 1 | 1 | - | - |"
        )
    if grid:  # rows: classes 0..9; columns: the first of each class under every network at the last guidance
        last = f"w={float(guidance.split(',')[-1]):g}"
        chosen = {name: images[:10] for name, images in pictures.items() if name.endswith(last)}
        save_grid(chosen, grid, rows=10)


if __name__ == "__main__":
    main()
