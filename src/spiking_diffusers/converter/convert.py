"""``convert``: a :class:`QCFSUNet2DModel` in, an integrate-and-fire :class:`SpikingUNet2DModel` out."""

from __future__ import annotations

from .models import QCFSUNet2DModel, SpikingUNet2DModel


def convert(qnet: QCFSUNet2DModel, spike_steps: int | None = None, **options) -> SpikingUNet2DModel:
    """:meth:`SpikingUNet2DModel.from_qcfs` as a function: ``spike_steps`` is T (default 8; ``timesteps=`` is
    its deprecated name), then ``neuron``, ``nonlinear_mode``, ``execution``, ``threshold_form``,
    ``time_embedding``, ``tsm``, ``filter_fn``, ``burst``, ``nonlinear_steps``, ``delta_spikes`` (see there)."""
    return SpikingUNet2DModel.from_qcfs(qnet, spike_steps, **options)
