"""Reference UNet architectures used by the benchmarks and tests (random weights are enough to measure
conversion cost, energy and fidelity trends; the hub checkpoints are not needed offline)."""

from __future__ import annotations

DDPM_CIFAR10_32: dict = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=32,
    attention_head_dim=None,
)
"""The exact ``UNet2DModel`` configuration of google/ddpm-cifar10-32 (35.7 M parameters)."""
