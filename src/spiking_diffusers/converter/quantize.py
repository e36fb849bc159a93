"""``quantize``: a pretrained ``UNet2DModel`` in, a :class:`QCFSUNet2DModel` with initialised thresholds out."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import UNet2DModel

from .building import move_like, spatial_size, unet_config_dict
from .models import QCFSUNet2DModel, SpikingUNet2DModel
from .support import check_functional_activations, check_structure


def conditioning_kwargs(unet_config: dict, batch: int, generator: torch.Generator) -> dict:
    """Random class labels for class-conditional UNets (empty for unconditional ones)."""
    embed_type, num_classes = unet_config.get("class_embed_type"), unet_config.get("num_class_embeds")
    if embed_type is None and num_classes:
        return {"class_labels": torch.randint(0, num_classes, (batch,), generator=generator)}
    if embed_type == "timestep":
        return {"class_labels": torch.randint(0, 1000, (batch,), generator=generator)}
    if embed_type == "identity":
        dim = unet_config.get("time_embedding_dim") or unet_config["block_out_channels"][0] * 4
        return {"class_labels": torch.randn(batch, dim, generator=generator)}
    return {}


def noised_probe_batches(
    unet_config: dict, num_samples: int = 16, batch_size: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Pure-noise samples at diffusion timesteps spread evenly over the schedule, as
    ``(sample, timestep, forward_kwargs)`` batches.

    A data-free stand-in for calibration data, good enough for a first threshold estimate; the
    calibration package builds better inputs from the model's own samples.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = spatial_size(unet_config.get("sample_size") or 32)
    train_steps = unet_config.get("num_train_timesteps") or 1000
    # from 1: Fourier-embedded UNets take log(t)
    timesteps = torch.linspace(1, train_steps - 1, num_samples).round().long()
    batches = []
    for start in range(0, num_samples, batch_size):
        t = timesteps[start : start + batch_size]
        x = torch.randn(len(t), unet_config["in_channels"], height, width, generator=generator)
        batches.append((x, t, conditioning_kwargs(unet_config, len(t), generator)))
    return batches


def to_device(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]], device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Move ``(sample, timestep, kwargs)`` batches to a device; samples (and float kwargs) to ``dtype``."""

    def move(value):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)

    return [(move(x), t.to(device), {k: move(v) for k, v in kw.items()}) for x, t, kw in batches]


def quantize(
    unet: UNet2DModel,
    levels: int = 8,
    phi: float = 0.5,
    per_channel: bool = False,
    init: str | None = "percentile",
    percentile: float = 99.9,
    num_samples: int = 16,
    seed: int = 0,
    residual_spikes: bool = False,
) -> QCFSUNet2DModel:
    """Replace every activation call site of ``unet`` by its own QCFS unit (``levels`` = L).

    The original ``unet`` is not modified. Thresholds start from ``init`` ("percentile" of each site's
    input, or "mse": the quantization-error minimiser) measured on ``num_samples`` noised inputs; pass
    ``init=None`` to leave them at 1 (e.g. before a full calibration). ``residual_spikes=True`` also puts a
    signed QCFS encoder (its own threshold, initialised the same way) in front of every convolution that
    reads the residual stream and of the attention projections, so that the spiking network feeds those
    layers spikes too. Raises
    :class:`~spiking_diffusers.converter.support.UnsupportedModuleError` naming any module that
    cannot be converted.
    """
    from ..calibration.statistics import collect_site_inputs, init_thresholds
    from ..validation import check_bool, check_choice, check_float, check_int

    if isinstance(unet, QCFSUNet2DModel | SpikingUNet2DModel):
        raise TypeError(f"quantize() takes the original UNet2DModel; this model is already a {type(unet).__name__}.")
    if not isinstance(unet, torch.nn.Module):  # other modules: check_structure names what is not supported
        raise TypeError(f"quantize() takes a diffusers UNet2DModel, got {type(unet).__name__}.")
    levels = check_int(levels, "levels", "levels")
    check_float(phi, "phi", 0, 1)
    check_bool(per_channel, "per_channel")
    check_choice(init, "init", (None, "percentile", "mse"))
    check_float(percentile, "percentile", 0, 100, low_open=True)
    check_int(num_samples, "num_samples", "num_samples")
    check_int(seed, "seed", "seed")
    check_bool(residual_spikes, "residual_spikes")
    check_structure(unet)
    config = unet_config_dict(unet)
    qnet = QCFSUNet2DModel(
        unet_config=config,
        levels=int(levels),
        phi=phi,
        per_channel=per_channel,
        sample_size=config.get("sample_size"),
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        residual_spikes=residual_spikes,
    )
    move_like(qnet, unet)
    missing, unexpected = qnet.unet.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not key.endswith(".threshold") for key in missing):
        raise RuntimeError(f"Weights did not map onto the QCFS network: missing {missing}, unexpected {unexpected}.")
    qnet.eval()

    param = next(unet.parameters())
    sample, timestep, kwargs = to_device(
        noised_probe_batches(config, num_samples=1, seed=seed), param.device, param.dtype
    )[0]
    with qnet.as_ann():
        check_functional_activations(qnet.unet, sample, timestep, **kwargs)
    if init is not None:
        batches = to_device(noised_probe_batches(config, num_samples=num_samples, seed=seed), param.device, param.dtype)
        init_thresholds(qnet, collect_site_inputs(qnet, batches, seed=seed), method=init, percentile=percentile)
    return qnet
