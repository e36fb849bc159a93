"""Timestep-aware thresholds: a table of K thresholds per site, one per range of the diffusion schedule.

Activation ranges change along the diffusion trajectory (PTQ4DM, TDQ, TFMQ-DM). A model with
``threshold_groups`` K > 1 splits the schedule ``[0, N)`` (N: the UNet config's ``num_train_timesteps``,
1000 where it has none) into K equal ranges; a sample at diffusion timestep t belongs to group
``g = clamp(floor(t * K / N), 0, K - 1)``. Every site (QCFS unit, IF neuron, input encoder) then holds a
``(K, C)`` table of thresholds (``(K, 1)`` per site) instead of a ``(C,)`` vector (``(1,)``), and uses the
row of each sample's group. The model's forward computes the groups from the ``timestep`` it receives and
hands them to every site (``group_index``, one entry per sample of the batch the UNet runs on: ``T * B`` in
batched spiking execution, step-major) for the duration of the call. K = 1 is the single threshold of every
site, stored as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..validation import check_int

DEFAULT_SCHEDULE_LENGTH = 1000
"""The schedule length N of a UNet whose config has no ``num_train_timesteps`` (diffusers' default)."""


def schedule_length(unet_config: dict[str, Any]) -> int:
    """N, the number of diffusion timesteps the K groups split: ``num_train_timesteps`` or 1000."""
    return int(unet_config.get("num_train_timesteps") or DEFAULT_SCHEDULE_LENGTH)


def check_threshold_groups(value: Any, unet_config: dict[str, Any], name: str = "threshold_groups") -> int:
    """``value`` as K: a whole number in ``1 <= K <= 64`` and at most the schedule length N (each group
    holds at least one timestep), else a ``TypeError`` / ``ValueError`` naming ``name``."""
    value = check_int(value, name, "threshold_groups")
    length = schedule_length(unet_config)
    if value > length:
        raise ValueError(
            f"{name} must be at most the {length} diffusion timesteps of the model's schedule (each group holds a "
            f"range of them), got {value}."
        )
    return value


def table_groups(unit: nn.Module) -> int:
    """K of a site: the rows of its threshold table, 1 for a plain threshold vector."""
    return int(unit.threshold.shape[0]) if unit.threshold.dim() == 2 else 1


def group_thresholds(threshold: torch.Tensor, group_index: torch.Tensor | None) -> torch.Tensor:
    """The thresholds that apply to a batch: a ``(C,)`` / ``(1,)`` vector as it is, or the rows of a ``(K, C)``
    table for each sample's group (``(B, C)``; ``group_index`` of shape ``(B,)``)."""
    if threshold.dim() == 1:
        return threshold
    if group_index is None:
        raise RuntimeError(
            f"This site holds {threshold.shape[0]} timestep-aware thresholds but was called without the samples' "
            "groups; run it through QCFSUNet2DModel / SpikingUNet2DModel, whose forward selects them from the "
            "timestep."
        )
    return threshold[group_index]


def timestep_groups(timestep: Any, batch: int, groups: int, length: int, device: torch.device) -> torch.Tensor:
    """Each sample's group ``clamp(floor(t * K / N), 0, K - 1)`` as a ``(batch,)`` long tensor; ``timestep``
    is one value (any number or tensor) or one per sample. Tensor ops only, so that it traces into ONNX."""
    t = torch.as_tensor(timestep, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    # float32 is exact here: t * K is a whole number below 2^24, and floor of its correctly rounded quotient by N
    # is the true floor for N < 2^18.
    return torch.floor(t.to(torch.float32) * groups / length).clamp(0, groups - 1).long()


def grouped_sites(unet: nn.Module) -> list[nn.Module]:
    """Every module of ``unet`` with a threshold table (K > 1)."""
    return [
        module
        for module in unet.modules()
        if isinstance(getattr(module, "threshold", None), torch.Tensor) and module.threshold.dim() == 2
    ]


@contextlib.contextmanager
def selected_groups(sites: Sequence[nn.Module], group_index: torch.Tensor) -> Iterator[None]:
    """Give every site in ``sites`` the samples' groups for the duration of the block."""
    for site in sites:
        site.group_index = group_index
    try:
        yield
    finally:
        for site in sites:
            site.group_index = None


def make_threshold_tables(unet: nn.Module, groups: int) -> None:
    """Turn every site's threshold vector into a ``(groups, C)`` table holding it in every row, in place."""
    for module in list(unet.modules()):
        threshold = getattr(module, "threshold", None)
        if isinstance(threshold, nn.Parameter) and threshold.dim() == 1:
            module.threshold = nn.Parameter(threshold.detach().unsqueeze(0).repeat(groups, 1))


def copy_threshold(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s threshold (vector or table) into ``target``'s, taking its shape."""
    if target.threshold.shape != source.threshold.shape:
        like = target.threshold
        target.threshold = nn.Parameter(torch.empty(source.threshold.shape, dtype=like.dtype, device=like.device))
    target.threshold.data.copy_(source.threshold.data)
