"""Paired PSNR: each image against the reference image generated from the same noise.

A fidelity figure that needs no feature extractor (see "Measuring honestly" in docs/evaluation.md): with a
deterministic sampler the ANN's image from a given noise is the target the QCFS and spiking networks should reproduce.
"""

from __future__ import annotations

import torch


def paired_psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB of ``images[i]`` against ``reference[i]``, shape ``(N,)``.

    ``data_range`` is the span of the pixel values: 2 for images in ``[-1, 1]`` (the default), 1 for
    ``[0, 1]``, 255 for uint8. Identical images give ``inf``.
    """
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape.")
    if images.dim() < 2:
        raise ValueError("Expected a batch of images, shape (N, ...).")
    mse = (images.double() - reference.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)
