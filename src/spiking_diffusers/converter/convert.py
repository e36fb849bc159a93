"""``convert``: a :class:`QCFSUNet2DModel` in, an integrate-and-fire :class:`SpikingUNet2DModel` out."""

from __future__ import annotations

from .models import QCFSUNet2DModel, SpikingUNet2DModel


def convert(qnet: QCFSUNet2DModel, timesteps: int = 8, **options) -> SpikingUNet2DModel:
    """:meth:`SpikingUNet2DModel.from_qcfs` as a function (``neuron``, ``nonlinear_mode``, ``execution``,
    ``threshold_form``, ``time_embedding``, ``tsm``, ``filter_fn``; see there)."""
    return SpikingUNet2DModel.from_qcfs(qnet, timesteps=timesteps, **options)
