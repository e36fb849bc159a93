"""Calibration inputs: clean images x0, noised to x_t at diffusion timesteps across the whole schedule.

By default the x0 come from the original model itself (data-free): a short deterministic DDIM run of the
ANN, cached on disk so that later calibrations of the same model reuse it. Alternatively, a folder of
PNG/JPEG images resized to the model's sample size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from .. import distributed
from ..errors import DamagedFileError, InputError, check_finite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def default_cache_dir() -> Path:
    """``$SDM_CACHE_DIR`` or ``~/.cache/spiking-diffusers``."""
    return Path(os.environ.get("SDM_CACHE_DIR", Path.home() / ".cache" / "spiking-diffusers"))


def model_fingerprint(unet: UNet2DModel) -> str:
    """A hash of the UNet's config and weights, so a cache entry belongs to exactly one model."""
    digest = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    for tensor in unet.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def sample_model_images(
    unet: UNet2DModel,
    scheduler_config: dict,
    num_samples: int,
    sampler_steps: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``num_samples`` images in [-1, 1] drawn from ``unet`` with DDIM (eta 0), cached on disk.

    The cache key holds everything the images depend on: the model, the sampler's noise schedule (the same
    weights sample other images under another schedule), the count, the DDIM steps and the seed.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sampler = DDIMScheduler.from_config(scheduler_config)
    schedule = {k: v for k, v in sampler.config.items() if not k.startswith("_")}
    schedule_key = hashlib.sha256(json.dumps(schedule, sort_keys=True, default=str).encode()).hexdigest()[:8]
    key = f"{model_fingerprint(unet)}-{schedule_key}-n{num_samples}-s{sampler_steps}-seed{seed}"
    path = cache_dir / "calibration" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["x0"]
        except Exception:  # a damaged cache entry is simply rebuilt
            path.unlink(missing_ok=True)
    pipe = DDIMPipeline(unet=unet, scheduler=sampler)
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    from tqdm.auto import tqdm

    batches = distributed.my_batches(num_samples, batch_size)  # this process's share under accelerate launch
    with tqdm(total=sum(map(len, batches)), desc="calibration samples (DDIM)", disable=not progress) as bar:
        for indices in batches:
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]
            images = pipe(
                batch_size=len(indices), generator=generators, num_inference_steps=sampler_steps, output_type="np"
            )
            chunks.append(torch.from_numpy(np.asarray(images.images)).permute(0, 3, 1, 2) * 2 - 1)
            bar.update(len(indices))
    x0 = distributed.gather_batches(chunks, num_samples, batch_size).float().contiguous()
    check_finite(x0, "The calibration data (the model's own samples)", "its weights overflow; check the model.")
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # concurrent runs never share a staging file
        save_file({"x0": x0}, staging)
        staging.replace(path)
    return x0


def load_image_folder(folder: str | Path, sample_size: int, channels: int) -> torch.Tensor:
    """Every PNG/JPEG in ``folder`` (recursively), resized to ``sample_size`` and scaled to [-1, 1].

    Images of any size and colour mode are resized and converted to grayscale (``channels`` 1) or RGB
    (``channels`` 3); models with another channel count cannot take images and are refused.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise InputError(
            f"Image folders feed 1- or 3-channel models only; this model takes {channels}-channel samples. "
            "Leave out the image folder (calibration then uses the model's own samples)."
        )
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"No PNG or JPEG images in {folder}; point to a folder of images.")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                resized = image.convert(mode).resize((sample_size, sample_size), Image.Resampling.BICUBIC)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DamagedFileError(f"Cannot read the image {file} ({err}); remove or replace it.") from err
        array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
        images.append(torch.from_numpy(array.reshape(sample_size, sample_size, channels)).permute(2, 0, 1))
    return torch.stack(images)


class NoisedBatches:
    """Draws ``(x_t, t)`` batches: x0 from the pool, fresh noise, stratified timesteps over the schedule."""

    def __init__(self, x0: torch.Tensor, noise_scheduler: DDPMScheduler, generator: torch.Generator):
        self.x0 = x0
        self.scheduler = noise_scheduler
        self.generator = generator
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def stratified_timesteps(self, count: int) -> torch.Tensor:
        """One timestep per equal slice of the schedule, in random order."""
        edges = torch.arange(count) + torch.rand(count, generator=self.generator)
        timesteps = (edges * self.num_train_timesteps / count).long().clamp(0, self.num_train_timesteps - 1)
        return timesteps[torch.randperm(count, generator=self.generator)]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(x_t, t)``: x0 drawn from the pool, noised with fresh noise at stratified timesteps."""
        index = torch.randint(0, len(self.x0), (batch_size,), generator=self.generator)
        x0 = self.x0[index]
        noise = torch.randn(x0.shape, generator=self.generator)
        timesteps = self.stratified_timesteps(batch_size)
        return self.scheduler.add_noise(x0, noise, timesteps), timesteps
