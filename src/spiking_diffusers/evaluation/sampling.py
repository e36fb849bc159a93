"""Sampling every variant from the same noise, through per-image generators.

Image ``i`` of a run always uses a generator seeded from ``(seed, i)``, fresh for every variant, so the
ANN, QCFS and spiking networks start from the same initial noise and (for stochastic schedulers) draw the
same step noise; the pipeline makes each image independent of how the run is split into batches. Under
``accelerate launch`` the processes share the batches and gather the images: the same images as one process
makes. The seed stream is derived through ``numpy.random.SeedSequence``, apart from the plainly seeded
generators that calibration draws its data from, so evaluation noise does not coincide with calibration noise.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from ..distributed import gather_batches, my_batches
from ..label_tokens import LabelTokens
from ..pipelines import SpikingDiffusionPipeline
from .variants import Variant

_EVAL_STREAM = 0x5D3E7A1  # keeps evaluation seeds apart from other uses of the same --seed


def image_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per image index, seeded from ``(seed, index)`` only."""
    states = (np.random.SeedSequence((_EVAL_STREAM, seed, i)).generate_state(1, np.uint64)[0] for i in indices)
    return [torch.Generator().manual_seed(int(state)) for state in states]


@torch.no_grad()
def sample_variant(
    variant: Variant,
    scheduler: SchedulerMixin,
    num_images: int,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    label_tokens: LabelTokens | None = None,
) -> tuple[torch.Tensor, float]:
    """``num_images`` images of ``variant`` in ``[-1, 1]`` (CPU, float32) and the wall time in seconds.

    A conditional model draws image ``i`` with label ``class_labels[i]`` (through ``label_tokens`` for a
    cross-attention UNet) and classifier-free guidance ``guidance_scale``.
    """
    pipe = SpikingDiffusionPipeline(unet=variant.unet, scheduler=scheduler, label_tokens=label_tokens)
    conditioning = {} if guidance_scale == 1 else {"guidance_scale": guidance_scale}
    pipe.set_progress_bar_config(leave=False, desc="denoising", disable=not progress)
    images = []
    start = time.perf_counter()
    batches = my_batches(num_images, batch_size)  # this process's share under accelerate launch
    total = sum(len(indices) for indices in batches)
    with tqdm(total=total, desc=f"sampling {variant.name}", unit="img", disable=not progress) as bar:
        for indices in batches:
            if class_labels is not None:
                conditioning["class_labels"] = class_labels[list(indices)]
            out = pipe(
                batch_size=len(indices),
                generator=image_generators(seed, indices),
                num_inference_steps=steps,
                output_type="pt",
                **variant.forward_kwargs,
                **conditioning,
            ).images
            images.append(out.float().cpu() * 2 - 1)
            bar.update(len(indices))
    return gather_batches(images, num_images, batch_size), time.perf_counter() - start
