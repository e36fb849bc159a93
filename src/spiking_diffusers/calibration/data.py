"""Calibration inputs: clean images x0, noised to x_t at diffusion timesteps across the whole schedule.

By default the x0 come from the original model itself (data-free): a short deterministic DDIM run of the
ANN, cached on disk so that later calibrations of the same model reuse it. Alternatively, a folder of
PNG/JPEG images resized to the model's sample size.

Distillation trains on a fixed :class:`CalibrationSet`: noised inputs (x_t, t) drawn once, with timesteps
stratified over the whole schedule (:func:`stratified_timesteps`), and the original model's noise prediction
on each, computed once (:meth:`CalibrationSet.label`) instead of at every training step. For a class-label
conditional UNet every input also carries its conditioning (see :mod:`.conditioning`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from .. import distributed
from ..converter.building import spatial_size
from ..converter.probes import move_kwargs
from ..errors import DamagedFileError, InputError, check_finite
from .conditioning import LabelConditioning

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


def sample_cache_path(
    unet: UNet2DModel,
    scheduler_config: dict,
    num_samples: int,
    sampler_steps: int,
    seed: int,
    cache_dir: str | Path | None = None,
    conditioning: LabelConditioning | None = None,
) -> Path:
    """Where :func:`sample_model_images` caches these images (the file exists once they were drawn)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sampler = DDIMScheduler.from_config(scheduler_config)
    schedule = {k: v for k, v in sampler.config.items() if not k.startswith("_")}
    schedule_key = hashlib.sha256(json.dumps(schedule, sort_keys=True, default=str).encode()).hexdigest()[:8]
    key = f"{model_fingerprint(unet)}-{schedule_key}-n{num_samples}-s{sampler_steps}-seed{seed}"
    if conditioning is not None:
        key += f"-{conditioning.fingerprint}"
    return cache_dir / "calibration" / f"{key}.safetensors"


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
    on_batch: Callable[[int], None] | None = None,
    conditioning: LabelConditioning | None = None,
) -> torch.Tensor:
    """``num_samples`` images in [-1, 1] drawn from ``unet`` with DDIM (eta 0), cached on disk; with
    ``conditioning``, image ``i`` of label ``conditioning.pool_labels(num_samples)[i]`` (no guidance).

    The cache key holds everything the images depend on: the model, the sampler's noise schedule (the same
    weights sample other images under another schedule), the count, the DDIM steps and the seed (see
    :func:`sample_cache_path`). ``on_batch(n)`` is called after each batch of ``n`` images (progress).
    """
    path = sample_cache_path(unet, scheduler_config, num_samples, sampler_steps, seed, cache_dir, conditioning)
    if path.is_file():
        try:
            return load_file(path)["x0"]
        except Exception:  # a damaged cache entry is simply rebuilt
            path.unlink(missing_ok=True)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    from tqdm.auto import tqdm

    batches = distributed.my_batches(num_samples, batch_size)  # this process's share under accelerate launch
    with tqdm(total=sum(map(len, batches)), desc="calibration samples (DDIM)", disable=not progress) as bar:
        for indices in batches:
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]
            if conditioning is None:
                images = pipe(
                    batch_size=len(indices), generator=generators, num_inference_steps=sampler_steps, output_type="np"
                )
                chunks.append(torch.from_numpy(np.asarray(images.images)).permute(0, 3, 1, 2) * 2 - 1)
            else:
                labels = conditioning.pool_labels(num_samples)[indices.start : indices.stop]
                chunks.append(_conditional_ddim(pipe, generators, sampler_steps, conditioning.kwargs(labels)))
            bar.update(len(indices))
            if on_batch is not None:
                on_batch(len(indices))
    x0 = distributed.gather_batches(chunks, num_samples, batch_size).float().contiguous()
    check_finite(x0, "The calibration data (the model's own samples)", "its weights overflow; check the model.")
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # concurrent runs never share a staging file
        save_file({"x0": x0}, staging)
        staging.replace(path)
    return x0


def _conditional_ddim(pipe: DDIMPipeline, generators: list, steps: int, kwargs: dict) -> torch.Tensor:
    """DDIM (eta 0) samples in [-1, 1] of a conditional UNet, one per generator, conditioned by ``kwargs``
    (diffusers' DDIMPipeline takes no conditioning; this is its loop with it)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    param = next(unet.parameters())
    shape = (unet.config.in_channels, *spatial_size(unet.config.sample_size))
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(param.device, param.dtype)
    kwargs = move_kwargs(kwargs, param)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, **kwargs).sample, t, x, eta=0.0).prev_sample
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1) * 2 - 1


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
    """Draws ``(x_t, t, kwargs)`` batches: x0 from the pool, fresh noise, stratified timesteps over the schedule,
    and with ``conditioning`` each x0's label (or the null label) as the UNet's keyword arguments."""

    def __init__(
        self,
        x0: torch.Tensor,
        noise_scheduler: DDPMScheduler,
        generator: torch.Generator,
        conditioning: LabelConditioning | None = None,
    ):
        self.x0 = x0
        self.scheduler = noise_scheduler
        self.generator = generator
        self.conditioning = conditioning
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def stratified_timesteps(self, count: int) -> torch.Tensor:
        """One timestep per equal slice of the schedule, in random order."""
        edges = torch.arange(count) + torch.rand(count, generator=self.generator)
        timesteps = (edges * self.num_train_timesteps / count).long().clamp(0, self.num_train_timesteps - 1)
        return timesteps[torch.randperm(count, generator=self.generator)]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A batch ``(x_t, t, kwargs)``: x0 drawn from the pool, noised with fresh noise at stratified
        timesteps; ``kwargs`` the conditioning of each input (empty for an unconditional UNet)."""
        index = torch.randint(0, len(self.x0), (batch_size,), generator=self.generator)
        x0 = self.x0[index]
        noise = torch.randn(x0.shape, generator=self.generator)
        timesteps = self.stratified_timesteps(batch_size)
        kwargs = {}
        if self.conditioning is not None:
            labels = self.conditioning.pool_labels(len(self.x0))[index]
            kwargs = self.conditioning.kwargs(self.conditioning.input_labels(labels, self.generator))
        return self.scheduler.add_noise(x0, noise, timesteps), timesteps, kwargs


def stratified_timesteps(count: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` timesteps uniform over the schedule, stratified (one per equal slice) and in random order, so
    that a set of ``count`` covers the schedule to within 1 / ``count``. (Putting extra mass on the small-t
    end instead was measured to cost quality: docs/calibration.md, "Where the calibration inputs lie".)"""
    u = (torch.arange(count, dtype=torch.float64) + torch.rand(count, generator=generator, dtype=torch.float64)) / count
    t = (u * num_train_timesteps).floor().long().clamp(0, num_train_timesteps - 1)
    return t[torch.randperm(count, generator=generator)]


class CalibrationSet:
    """A fixed set of noised calibration inputs ``(x_t, t)`` and, once :meth:`label` ran, the original
    model's noise prediction on each (``targets``), which distillation then reuses at every step.

    Training batches are drawn from it with ``generator`` (uniformly, with replacement), so a phase is
    deterministic for a given generator state and continues exactly from a saved one. Memory: ``x_t`` and
    ``targets`` take ``2 * size * C * H * W * 4`` bytes in float32 (:attr:`nbytes`): 8 MiB for 4096 inputs of
    1 x 16 x 16, 96 MiB for 4096 of 3 x 32 x 32.
    """

    def __init__(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator,
        conditions: dict[str, torch.Tensor] | None = None,
    ):
        if len(x_t) != len(timesteps) or len(x_t) == 0:
            raise ValueError("A calibration set needs one timestep per input, and at least one input.")
        self.x_t = x_t
        self.timesteps = timesteps
        self.generator = generator
        self.conditions = conditions or {}  # per input: the UNet's conditioning keyword arguments
        self.targets: torch.Tensor | None = None

    @classmethod
    def draw(
        cls,
        x0: torch.Tensor,
        noise_scheduler: DDPMScheduler,
        size: int,
        generator: torch.Generator,
        conditioning: LabelConditioning | None = None,
    ) -> CalibrationSet:
        """``size`` inputs: every x0 of the pool in turn (so each is used ``size / len(x0)`` times, give or
        take one), fresh noise, timesteps from :func:`stratified_timesteps`, and with ``conditioning`` each
        x0's label (or the null label). ``generator`` draws all of it and then the training batches."""
        index = torch.arange(size) % len(x0)
        index = index[torch.randperm(size, generator=generator)]
        clean = x0[index]
        noise = torch.randn(clean.shape, generator=generator)
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        timesteps = stratified_timesteps(size, num_train_timesteps, generator)
        conditions = None
        if conditioning is not None:
            labels = conditioning.input_labels(conditioning.pool_labels(len(x0))[index], generator)
            conditions = conditioning.kwargs(labels)
        return cls(noise_scheduler.add_noise(clean, noise, timesteps), timesteps, generator, conditions)

    def __len__(self) -> int:
        return len(self.x_t)

    @property
    def nbytes(self) -> int:
        """Memory held by the inputs, timesteps and targets."""
        held = [self.x_t, self.timesteps, *self.conditions.values()]
        held += [self.targets] if self.targets is not None else []
        return sum(tensor.numel() * tensor.element_size() for tensor in held)

    @torch.no_grad()
    def label(
        self, teacher: torch.nn.Module, batch_size: int = 64, on_batch: Callable[[int], None] | None = None
    ) -> None:
        """Compute ``targets``: ``teacher``'s noise prediction on every input (kept on the CPU, in the
        teacher's dtype). Under ``accelerate launch`` each process labels its share of the batches and every
        process gets all of them. ``on_batch(n)`` is called after each batch of ``n`` inputs (progress)."""
        param = next(teacher.parameters())
        device = param.device
        teacher.eval()
        outputs = []
        for indices in distributed.my_batches(len(self), batch_size):
            batch = slice(indices.start, indices.stop)
            kwargs = move_kwargs({key: value[batch] for key, value in self.conditions.items()}, param)
            outputs.append(teacher(self.x_t[batch].to(device), self.timesteps[batch].to(device), **kwargs).sample.cpu())
            if on_batch is not None:
                on_batch(len(indices))
        self.targets = distributed.gather_batches(outputs, len(self), batch_size)
        check_finite(self.targets, "The original model's noise prediction", "its weights overflow; check the model.")

    def sample(
        self, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """A batch ``(x_t, t, target, kwargs)`` drawn from the set (``target`` is ``None`` before :meth:`label`;
        ``kwargs`` the inputs' conditioning, empty for an unconditional UNet)."""
        index = torch.randint(0, len(self), (batch_size,), generator=self.generator)
        targets = self.targets[index] if self.targets is not None else None
        kwargs = {key: value[index] for key, value in self.conditions.items()}
        return self.x_t[index], self.timesteps[index], targets, kwargs
