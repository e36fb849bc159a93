#!/usr/bin/env python
"""Train the small assets that ship inside ``spiking_diffusers``.

Two models, both on scikit-learn's handwritten digits upsampled to 16x16 in [-1, 1]:

1. ``DigitClassifier`` (train split, held-out test accuracy reported): the feature
   extractor of the offline Fréchet distance. Saved to ``assets/digits-classifier``.
2. A small unconditional diffusers ``UNet2DModel`` (SiLU, GroupNorm, self-attention at
   8x8, 4x4 and in the mid block), DDPM-trained (1000 steps, epsilon prediction) with
   AdamW, linear warmup + cosine decay and an EMA of the weights. The EMA UNet is saved
   as a ``DDPMPipeline`` to ``assets/digits-ddpm``; a grid of 64 DDIM-50 samples goes
   to ``docs/digits_samples.png`` (for a DDPM written elsewhere, ``samples.png`` beside it).

With ``--eval-samples N`` the script also draws N DDIM-50 samples and reports the
Fréchet distance of their classifier features to the real digits, and the rate of
confident classifier predictions on them.

``--preset conditional`` trains the label-conditional model instead: a ``UNet2DConditionModel``
(cross-attention at 8x8, 4x4 and in the mid block, GEGLU feed-forwards) conditioned on the digit
label through ``encoder_hidden_states``: a ``LabelTokens`` table with one learned token per class and
a null token, the label dropped to the null token for 10 % of the training samples so that
classifier-free guidance works. It is saved as a ``SpikingDiffusionPipeline`` (unet, scheduler,
label_tokens) to ``assets/digits-conditional``; its evaluation adds the conditional accuracy (the
share of samples the classifier assigns to the requested label) with and without guidance.

Example (CPU, one thread, about 30 minutes)::

    OMP_NUM_THREADS=1 python scripts/train_digits.py --threads 1
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spiking_diffusers.digits import (
    SHIPPED_CLASSIFIER_PATH,
    SHIPPED_CONDITIONAL_PATH,
    SHIPPED_MODEL_PATH,
    DigitClassifier,
    load_digit_dataset,
    load_digit_images,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "act_fn": "silu",
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}

VALIDATION_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "block_out_channels": (24, 48, 48),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}
VALIDATION_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "beta_schedule": "linear"}
CONDITIONAL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "act_fn": "silu",
}
LABEL_DROPOUT = 0.1
"""Share of training samples whose label is replaced by the null token (classifier-free guidance)."""
GUIDANCE_SCALE = 1.5
"""The guidance of the sample grid: on the shipped model (DDIM 50, 1000 samples) w = 1 already draws the asked-for
digit 98.6 % of the time (FD 0.60) and w = 1.5 98.8 % (FD 2.30), while w = 3 over-saturates this small model
(31.8 %, FD 40)."""
EVAL_GUIDANCE = (1.0, GUIDANCE_SCALE, 3.0)
PRESETS = {
    "shipped": (UNET_CONFIG, SCHEDULER_CONFIG),
    # The label-conditional model (UNet2DConditionModel + LabelTokens), shipped as assets/digits-conditional.
    "conditional": (CONDITIONAL_UNET_CONFIG, SCHEDULER_CONFIG),
    # A second, differently shaped digits DDPM (other widths, two ResNets per level, attention at 4x4 only,
    # linear betas like google/ddpm-cifar10-32) to check that a method is not tuned to the shipped model.
    # It is not shipped: train it with --preset validation --ddpm-out outputs/validation-ddpm.
    "validation": (VALIDATION_UNET_CONFIG, VALIDATION_SCHEDULER_CONFIG),
}


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    return (model.predict_proba(x).argmax(-1) == y).float().mean().item()


def train_classifier(out: Path, epochs: int, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Train :class:`DigitClassifier` on the train split; save it; return a summary."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digit_dataset(IMAGE_SIZE, "train")
    x_test, y_test = load_digit_dataset(IMAGE_SIZE, "test")
    model = DigitClassifier(image_size=IMAGE_SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps_per_epoch, total))
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="classifier", unit="epoch")
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for idx in perm.split(batch_size):
            xb = random_shift(x_train[idx], 2, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{classifier_accuracy(model, x_test, y_test):.4f}")
    model.eval()
    summary = {
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "train_accuracy": classifier_accuracy(model, x_train, y_train),
        "test_accuracy": classifier_accuracy(model, x_test, y_test),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def count_macs(unet: torch.nn.Module) -> int:
    """Multiply-accumulates of one forward pass on one 16x16 image (conv, linear, attention matmuls)."""
    from diffusers.models.attention_processor import Attention

    total = 0

    def conv_hook(m: torch.nn.Conv2d, _i: Any, o: torch.Tensor) -> None:
        nonlocal total
        total += o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: torch.nn.Linear, _i: Any, o: torch.Tensor) -> None:
        nonlocal total
        total += o[0].numel() * m.in_features

    def attn_hook(m: Attention, i: tuple[torch.Tensor, ...], _o: Any) -> None:
        nonlocal total
        h = i[0]
        tokens = h.shape[2] * h.shape[3] if h.ndim == 4 else h.shape[1]
        total += 2 * tokens * tokens * m.inner_dim  # QK^T and attn @ V

    hooks = []
    for mod in unet.modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, Attention):
            hooks.append(mod.register_forward_hook(attn_hook))
    width = unet.config.get("cross_attention_dim")
    kwargs = {"encoder_hidden_states": torch.zeros(1, 1, width)} if width else {}
    with torch.no_grad():
        unet(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([500]), **kwargs)
    for h in hooks:
        h.remove()
    return total


def train_ddpm(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    shift: int,
    split: str,
    seed: int,
    preset: str = "shipped",
) -> tuple[Any, dict[str, Any]]:
    """DDPM-train the UNet (and, for the conditional preset, its label tokens); save the EMA weights as a
    ``DDPMPipeline`` (a ``SpikingDiffusionPipeline`` with label tokens when conditional); return (pipeline,
    summary)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.training_utils import EMAModel

    from spiking_diffusers import LabelTokens, SpikingDiffusionPipeline

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data, labels = load_digit_dataset(IMAGE_SIZE, split)  # type: ignore[arg-type]
    unet_config, scheduler_config = PRESETS[preset]
    conditional = "cross_attention_dim" in unet_config
    unet_class = UNet2DConditionModel if conditional else UNet2DModel
    unet = unet_class(**unet_config)
    tokens = LabelTokens(10, unet_config["cross_attention_dim"]) if conditional else None
    parameters = [*unet.parameters(), *(tokens.parameters() if tokens is not None else [])]
    scheduler = DDPMScheduler(**scheduler_config)
    ema = EMAModel(parameters, decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))
    alphas_cumprod = scheduler.alphas_cumprod

    start = time.perf_counter()
    perm = torch.randperm(len(data), generator=gen)
    cursor = 0
    running = None
    bar = tqdm(range(steps), desc="ddpm", unit="step", mininterval=5.0)
    unet.train()
    for step in bar:
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(data), generator=gen), 0
        batch = perm[cursor : cursor + batch_size]
        x0 = random_shift(data[batch], shift, gen)
        cursor += batch_size
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        kwargs = {}
        if tokens is not None:
            dropped = torch.rand(len(x0), generator=gen) < LABEL_DROPOUT
            kwargs["encoder_hidden_states"] = tokens(labels[batch].masked_fill(dropped, tokens.null_label))
        loss = F.mse_loss(unet(xt, t, **kwargs).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        opt.step()
        sched.step()
        ema.step(parameters)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    wall = time.perf_counter() - start

    ema_unet = unet_class(**unet_config)
    ema_tokens = LabelTokens(**tokens.config) if tokens is not None else None
    ema.copy_to([*ema_unet.parameters(), *(ema_tokens.parameters() if ema_tokens is not None else [])])
    ema_unet.eval()
    if ema_tokens is not None:
        pipe = SpikingDiffusionPipeline(unet=ema_unet, scheduler=scheduler, label_tokens=ema_tokens.eval())
    else:
        pipe = DDPMPipeline(unet=ema_unet, scheduler=scheduler)
    if out.exists() and (out / "model_index.json").exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    summary = {
        "preset": preset,
        "data_split": split,
        "n_images": len(data),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "lr_schedule": "linear warmup + cosine to 0",
        "optimizer": "AdamW(weight_decay=1e-4), grad clip 1.0",
        "ema": f"diffusers EMAModel(decay={ema_decay}, use_ema_warmup=True, power=0.75)",
        "shift_augmentation_px": shift,
        "label_dropout": LABEL_DROPOUT if conditional else None,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "final_loss_ema": round(float(running or 0.0), 5),
        "wall_seconds": round(wall, 1),
        "parameters": sum(p.numel() for p in ema_unet.parameters()),
        "macs_per_image": count_macs(ema_unet),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return pipe, summary


@torch.no_grad()
def ddim_samples(unet: Any, scheduler_config: Any, n: int, seed: int, batch_size: int = 250) -> torch.Tensor:
    """``n`` DDIM samples (50 steps, eta 0) in [-1, 1], shape (n, 1, 16, 16)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(50)
    gen = torch.Generator().manual_seed(seed)
    unet.eval()
    out = []
    for start in tqdm(range(0, n, batch_size), desc="ddim-50", unit="batch"):
        x = torch.randn((min(batch_size, n - start), 1, IMAGE_SIZE, IMAGE_SIZE), generator=gen)
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def conditional_samples(
    pipe: Any, n: int, seed: int, guidance_scale: float, batch_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` DDIM-50 samples in [-1, 1] of the labels ``0, 1, ..., 9, 0, ...`` (and the labels)."""
    from diffusers import DDIMScheduler

    from spiking_diffusers import SpikingDiffusionPipeline

    sampler = SpikingDiffusionPipeline(
        unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config), label_tokens=pipe.label_tokens
    )
    sampler.set_progress_bar_config(disable=True)
    labels = torch.arange(n) % 10
    out = []
    for start in tqdm(range(0, n, batch_size), desc=f"ddim-50 w={guidance_scale:g}", unit="batch"):
        chunk = labels[start : start + batch_size]
        images = sampler(
            batch_size=len(chunk),
            generator=torch.Generator().manual_seed(seed + start),
            num_inference_steps=50,
            output_type="pt",
            class_labels=chunk,
            guidance_scale=guidance_scale,
        ).images
        out.append(images * 2 - 1)
    return torch.cat(out), labels


def evaluate_conditional(pipe: Any, classifier: DigitClassifier, n: int, seed: int) -> dict[str, Any]:
    """FD to the real digits and conditional accuracy (classifier agrees with the requested label) at each
    guidance scale of :data:`EVAL_GUIDANCE` (1: none)."""
    with torch.no_grad():
        real = classifier.features(load_digit_images(IMAGE_SIZE, "all")).double().numpy()
    metrics: dict[str, Any] = {"n_samples": n, "sampler": "DDIM 50 steps, eta 0"}
    for scale in EVAL_GUIDANCE:
        samples, labels = conditional_samples(pipe, n, seed, scale)
        with torch.no_grad():
            features = classifier.features(samples).double().numpy()
            predicted = classifier.predict_proba(samples).argmax(-1)
        metrics[f"guidance_{scale:g}"] = {
            "fd_samples_vs_real_all": round(frechet_distance(features, real), 3),
            "conditional_accuracy": round((predicted == labels).float().mean().item(), 4),
        }
    return metrics


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, pad: int = 2, scale: int = 4) -> None:
    """Save images in [-1, 1] as a grayscale PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad), 0.2, dtype=np.float32)
    imgs = ((images[:, 0].clamp(-1, 1) + 1) / 2).numpy()
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    # Digits are light strokes on a dark background in the data; show them dark on light.
    pixels = ((1.0 - grid) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)  # 2-D uint8 -> mode "L"
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows = samples).

    ``tr sqrtm(S1 S2)`` is computed as ``tr sqrtm(S1^1/2 S2 S1^1/2)`` with symmetric
    eigendecompositions, which stays stable when the covariances are singular (dead ReLU
    features).
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def evaluate(unet: Any, scheduler_config: Any, classifier: DigitClassifier, n: int, seed: int) -> dict[str, Any]:
    """FD of classifier features (samples vs all real digits), confident rate, class histogram."""
    samples = ddim_samples(unet, scheduler_config, n, seed)
    real = load_digit_images(IMAGE_SIZE, "all")
    train, test = load_digit_images(IMAGE_SIZE, "train"), load_digit_images(IMAGE_SIZE, "test")
    with torch.no_grad():
        f_s = classifier.features(samples).double().numpy()
        f_r = classifier.features(real).double().numpy()
        f_tr, f_te = classifier.features(train).double().numpy(), classifier.features(test).double().numpy()
    conf, pred = classifier.predict_proba(samples).max(-1)
    conf_real = classifier.predict_proba(real).max(-1).values
    return {
        "n_samples": n,
        "sampler": "DDIM 50 steps, eta 0",
        "fd_samples_vs_real_all": round(frechet_distance(f_s, f_r), 3),
        "fd_real_test_vs_real_train": round(frechet_distance(f_te, f_tr), 3),
        "confident_rate_p>0.9": round((conf > 0.9).float().mean().item(), 4),
        "confident_rate_real_p>0.9": round((conf_real > 0.9).float().mean().item(), 4),
        "mean_max_prob": round(conf.mean().item(), 4),
        "mean_max_prob_real": round(conf_real.mean().item(), 4),
        "class_histogram": torch.bincount(pred, minlength=10).tolist(),
    }


@click.command(context_settings={"show_default": True})
@click.option("--classifier-out", type=click.Path(path_type=Path), default=SHIPPED_CLASSIFIER_PATH)
@click.option(
    "--ddpm-out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the DDPM goes (default: the shipped digits-ddpm, or digits-conditional for --preset conditional).",
)
@click.option(
    "--samples-png",
    type=click.Path(path_type=Path),
    default=None,
    help="Sample grid (default: docs/digits_samples.png or docs/digits_conditional_samples.png for the shipped "
    "models, samples.png in --ddpm-out for any other).",
)
@click.option("--skip-classifier", is_flag=True, help="Do not train the classifier (load it from --classifier-out).")
@click.option("--skip-ddpm", is_flag=True, help="Do not train the DDPM (load it from --ddpm-out).")
@click.option("--classifier-epochs", default=40)
@click.option("--ddpm-steps", default=5000, help="Optimizer steps of DDPM training.")
@click.option("--batch-size", default=128, help="DDPM batch size.")
@click.option("--lr", default=2e-3, help="DDPM peak learning rate.")
@click.option("--warmup", default=200, help="DDPM warmup steps.")
@click.option("--ema-decay", default=0.999, help="Maximum EMA decay.")
@click.option("--shift", default=0, help="Max random shift (pixels at 16x16) for DDPM augmentation.")
@click.option("--split", type=click.Choice(["all", "train"]), default="all", help="Digits the DDPM trains on.")
@click.option("--eval-samples", default=1000, help="DDIM samples for the FD check (0: skip).")
@click.option("--seed", default=0)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="shipped", help="UNet shape and noise schedule.")
@click.option("--threads", default=1, help="torch.set_num_threads.")
def main(
    classifier_out: Path,
    ddpm_out: Path,
    samples_png: Path,
    skip_classifier: bool,
    skip_ddpm: bool,
    classifier_epochs: int,
    ddpm_steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    shift: int,
    split: str,
    eval_samples: int,
    seed: int,
    preset: str,
    threads: int,
) -> None:
    """Train the digit classifier and the digits DDPM that ship with spiking_diffusers."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    conditional = preset == "conditional"
    shipped_dir = Path(SHIPPED_CONDITIONAL_PATH if conditional else SHIPPED_MODEL_PATH)
    ddpm_out = Path(ddpm_out or shipped_dir)
    name = "digits_conditional_samples.png" if conditional else "digits_samples.png"
    # the docs' grids show the shipped models: any other DDPM (the validation preset) gets its grid beside it
    shipped = ddpm_out.resolve() == shipped_dir.resolve()
    samples_png = samples_png or (REPO_ROOT / "docs" / name if shipped else ddpm_out / "samples.png")

    if skip_classifier:
        classifier = DigitClassifier.from_pretrained(classifier_out)
    else:
        summary = train_classifier(classifier_out, classifier_epochs, seed)
        click.echo(f"classifier: {json.dumps(summary)}")
        classifier = DigitClassifier.from_pretrained(classifier_out)
    x_test, y_test = load_digit_dataset(IMAGE_SIZE, "test")
    click.echo(f"classifier held-out accuracy: {classifier_accuracy(classifier, x_test, y_test):.4f}")

    from diffusers import DiffusionPipeline

    if skip_ddpm:
        pipe = DiffusionPipeline.from_pretrained(str(ddpm_out))
    else:
        pipe, summary = train_ddpm(ddpm_out, ddpm_steps, batch_size, lr, warmup, ema_decay, shift, split, seed, preset)
        click.echo(f"ddpm: {json.dumps(summary)}")

    if conditional:  # one row per class, guided
        grid, _ = conditional_samples(pipe, 80, seed, GUIDANCE_SCALE)
        grid = grid.reshape(8, 10, *grid.shape[1:]).transpose(0, 1).flatten(0, 1)
    else:
        grid = ddim_samples(pipe.unet, pipe.scheduler.config, 64, seed)
    save_grid(grid, samples_png)
    click.echo(f"sample grid: {samples_png}")

    if eval_samples > 0:
        if conditional:
            metrics = evaluate_conditional(pipe, classifier, eval_samples, seed + 1)
        else:
            metrics = evaluate(pipe.unet, pipe.scheduler.config, classifier, eval_samples, seed + 1)
        click.echo(f"eval: {json.dumps(metrics)}")
        if not skip_ddpm:
            info = json.loads((ddpm_out / "training.json").read_text())
            info["eval"] = metrics
            (ddpm_out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
