"""``quantize``: a pretrained ``UNet2DModel`` in, a :class:`QCFSUNet2DModel` with initialised thresholds out."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from .building import move_like, unet_config_dict
from .models import QCFSUNet2DModel
from .support import check_functional_activations


def noised_probe_batches(
    unet_config: dict, num_samples: int = 16, batch_size: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pure-noise samples at diffusion timesteps spread evenly over the schedule.

    A data-free stand-in for calibration data, good enough for a first threshold estimate; the
    calibration package builds better inputs from the model's own samples.
    """
    generator = torch.Generator().manual_seed(seed)
    size = unet_config.get("sample_size") or 32
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    train_steps = unet_config.get("num_train_timesteps") or 1000
    timesteps = torch.linspace(0, train_steps - 1, num_samples).round().long()
    batches = []
    for start in range(0, num_samples, batch_size):
        t = timesteps[start : start + batch_size]
        x = torch.randn(len(t), unet_config["in_channels"], height, width, generator=generator)
        batches.append((x, t))
    return batches


def quantize(
    unet: UNet2DModel,
    levels: int = 8,
    phi: float = 0.5,
    per_channel: bool = False,
    init: str | None = "percentile",
    percentile: float = 99.9,
    num_samples: int = 16,
    seed: int = 0,
) -> QCFSUNet2DModel:
    """Replace every activation call site of ``unet`` by its own QCFS unit (``levels`` = L).

    The original ``unet`` is not modified. Thresholds start from ``init`` ("percentile" of each site's
    input, or "mse": the quantization-error minimiser) measured on ``num_samples`` noised inputs; pass
    ``init=None`` to leave them at 1 (e.g. before a full calibration). Raises
    :class:`~spiking_diffusers.converter.support.UnsupportedModuleError` naming any module that
    cannot be converted.
    """
    from ..calibration.statistics import collect_site_inputs, init_thresholds

    if int(levels) < 1:
        raise ValueError(f"levels must be at least 1, got {levels}.")
    config = unet_config_dict(unet)
    qnet = QCFSUNet2DModel(
        unet_config=config,
        levels=int(levels),
        phi=phi,
        per_channel=per_channel,
        sample_size=config.get("sample_size"),
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
    )
    move_like(qnet, unet)
    missing, unexpected = qnet.unet.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not key.endswith(".threshold") for key in missing):
        raise RuntimeError(
            f"Weights did not map onto the QCFS network: missing {missing}, unexpected {unexpected}."
        )
    qnet.eval()

    batches = noised_probe_batches(config, num_samples=min(num_samples, 4), seed=seed)
    sample, timestep = batches[0]
    with qnet.as_ann():
        check_functional_activations(
            qnet.unet, sample[:1].to(unet.device, unet.dtype), timestep[:1].to(unet.device)
        )
    if init is not None:
        batches = noised_probe_batches(config, num_samples=num_samples, seed=seed)
        batches = [(x.to(unet.device, unet.dtype), t.to(unet.device)) for x, t in batches]
        init_thresholds(
            qnet, collect_site_inputs(qnet, batches, seed=seed), method=init, percentile=percentile
        )
    return qnet
