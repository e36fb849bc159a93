"""``quantize``: a pretrained ``UNet2DModel`` in, a :class:`QCFSUNet2DModel` with initialised thresholds out."""

from __future__ import annotations

from diffusers import UNet2DModel

from .models import QCFSUNet2DModel


def quantize(unet: UNet2DModel, levels: int = 8, **options) -> QCFSUNet2DModel:
    """:meth:`QCFSUNet2DModel.from_unet` as a function (``phi``, ``per_channel``, ``init``, ``percentile``,
    ``num_samples``, ``seed``, ``residual_spikes``; see there)."""
    return QCFSUNet2DModel.from_unet(unet, levels=levels, **options)
