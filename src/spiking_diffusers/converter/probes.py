"""Data-free probe inputs for a UNet: pure noise at timesteps spread over the schedule, with random
conditioning where the UNet takes class labels. Enough for a first threshold estimate and for the
functional check; the calibration package builds better inputs from the model's own samples."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .building import spatial_size

PROBE_TOKENS = 8
"""Tokens of the random ``encoder_hidden_states`` that probe a cross-attention UNet."""


def conditioning_kwargs(unet_config: dict, batch: int, generator: torch.Generator) -> dict:
    """Random class labels for class-conditional UNets and random ``encoder_hidden_states`` for
    cross-attention UNets (empty for unconditional ones)."""
    kwargs = {}
    width = unet_config.get("cross_attention_dim")
    if width is not None:
        kwargs["encoder_hidden_states"] = torch.randn(batch, PROBE_TOKENS, width, generator=generator)
    embed_type, num_classes = unet_config.get("class_embed_type"), unet_config.get("num_class_embeds")
    if embed_type is None and num_classes:
        kwargs["class_labels"] = torch.randint(0, num_classes, (batch,), generator=generator)
    elif embed_type == "timestep":
        kwargs["class_labels"] = torch.randint(0, 1000, (batch,), generator=generator)
    elif embed_type == "identity":
        dim = unet_config.get("time_embedding_dim") or unet_config["block_out_channels"][0] * 4
        kwargs["class_labels"] = torch.randn(batch, dim, generator=generator)
    return kwargs


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


def move_kwargs(kwargs: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward keyword tensors (conditioning) on ``like``'s device, the floating ones (embeddings) in its dtype."""
    return {
        key: value.to(like.device, like.dtype) if value.is_floating_point() else value.to(like.device)
        for key, value in kwargs.items()
    }


def to_device(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]], device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Move ``(sample, timestep, kwargs)`` batches to a device; samples (and float kwargs) to ``dtype``."""
    moved = []
    for x, t, kw in batches:
        x = x.to(device, dtype)
        moved.append((x, t.to(device), move_kwargs(kw, x)))
    return moved
