"""A per-timestep linear filter on the noise prediction, fitted to the original network by least squares.

At the noisy end of the schedule the noise prediction is almost the input itself (eps ~ x_t / sqrt(1 - abar));
what the network adds to it is small and smooth (its estimate of x0, scaled by sqrt(abar / (1 - abar))). The
QCFS network's error there is as large as that addition and much less smooth, and the first DDIM steps amplify
it into the whole sample (docs/calibration.md, "The output filter"). A small linear filter over the prediction
and the input, one per range of the schedule, removes most of it:

    out = W_g * [prediction, sample] + b_g        (a k x k convolution, edge-replicated borders)

with ``g`` the sample's range of the schedule (``groups`` equal ranges, as for timestep-aware thresholds; see
:mod:`.timestep_groups`). It starts as the identity on the prediction; calibration fits each range's ``W_g`` and
``b_g`` in closed form (:func:`spiking_diffusers.calibration.output_filter.fit_output_filter`). It runs once per
denoising step on the model's (time-averaged) output and reads real values, so the energy count prices it in
multiply-accumulates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_int
from .timestep_groups import timestep_groups

DEFAULT_FILTER_GROUPS = 20
"""Ranges of the schedule with their own filter: 50 diffusion timesteps each on a 1000-step schedule."""


def check_output_filter(kernel_size: Any, groups: Any, name: str = "output_filter") -> tuple[int, int]:
    """``(k, groups)``: ``k`` 0 (no filter) or an odd kernel size up to 15, ``groups`` a whole number >= 1."""
    kernel_size = check_int(kernel_size, name, low=0)
    if kernel_size and (kernel_size % 2 == 0 or kernel_size > 15):
        raise ValueError(f"{name} must be 0 (no output filter) or an odd kernel size from 1 to 15, got {kernel_size}.")
    return kernel_size, check_int(groups, f"{name}_groups", low=1)


class OutputFilter(nn.Module):
    """``forward(prediction, sample, timestep)``: each sample's range-``g`` filter over ``[prediction, sample]``.

    ``weight`` is ``(groups, out_channels, out_channels + in_channels, k, k)`` and ``bias`` ``(groups,
    out_channels)``; both are buffers (fitted in closed form, never trained by gradient) saved with the model.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int, schedule_length: int):
        super().__init__()
        self.kernel_size, self.groups = check_output_filter(kernel_size, groups)
        if not self.kernel_size:
            raise ValueError("An OutputFilter needs a kernel size >= 1 (0 means: no filter).")
        self.schedule_length = int(schedule_length)
        self.out_channels = int(out_channels)
        inputs = int(out_channels) + int(in_channels)
        self.register_buffer("weight", torch.zeros(self.groups, self.out_channels, inputs, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(self.groups, self.out_channels))
        centre = kernel_size // 2
        for channel in range(self.out_channels):
            self.weight[:, channel, channel, centre, centre] = 1.0

    def group_index(self, timestep: Any, batch: int, device: torch.device) -> torch.Tensor:
        """Each sample's range of the schedule, ``(batch,)``."""
        return timestep_groups(timestep, batch, self.groups, self.schedule_length, device)

    def filter_inputs(self, prediction: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """``[prediction, sample]`` with ``k // 2`` edge-replicated pixels around it."""
        pad = self.kernel_size // 2
        stacked = torch.cat([prediction, sample.to(prediction.dtype)], dim=1)
        return F.pad(stacked, (pad, pad, pad, pad), mode="replicate") if pad else stacked

    def forward(self, prediction: torch.Tensor, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        batch = prediction.shape[0]
        group = self.group_index(timestep, batch, prediction.device)
        weight = self.weight[group].to(prediction.dtype).flatten(2)  # (batch, out, D): one filter per sample
        # Patches times each sample's own filter in one batched matmul: a convolution whose kernel differs per
        # sample, which an exported graph can run for any batch (a grouped convolution cannot).
        patches = F.unfold(self.filter_inputs(prediction, sample), self.kernel_size)  # (batch, D, H * W)
        out = torch.bmm(weight, patches).unflatten(2, prediction.shape[2:])  # the batch from the product: any in ONNX
        return out + self.bias[group].to(prediction.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, groups={self.groups}"
