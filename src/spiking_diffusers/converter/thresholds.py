"""Activation statistics per call site, and threshold initialisation from them (the units' first guess).

The QCFS network runs as the original ANN (``as_ann``) while observers on its units keep a bounded
random subsample of every site's input; thresholds are then set per site (or per channel) by a
percentile of the positive inputs or by the value that minimises the site's quantization error. The
signed input encoders of residual spikes are sites here too: their percentile is of the input's
magnitude, and their quantization error is measured against the identity. With timestep-aware thresholds
(a ``(K, C)`` table per site, see :mod:`.timestep_groups`) each group's row is set from the inputs of the
samples in its range of the schedule (:func:`collect_group_site_inputs`).

A unit with offsets (``a(z) = qcfs(z - shift) + offset``) gets its threshold and offset together, with
shift = offset so that the unit still follows the identity above 0: the percentile init takes the lowest
value of the activation over the site's inputs (SiLU: down to -0.278) as the offset and the percentile of
the shifted inputs as lambda; the MSE init tries fractions :data:`OFFSET_FRACTIONS` of that lowest value
(0: the unit without offset) and keeps, per channel, the pair (offset, MSE-optimal lambda) with the lowest
quantization error, so that it is never worse than the unit without offset.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .encoders import SignedQCFS, signed_qcfs
from .qcfs import MIN_THRESHOLD, QCFSActivation, QuantizerUnit, broadcast_channels, qcfs
from .timestep_groups import table_groups

if TYPE_CHECKING:  # the model imports this module for its threshold initialisation
    from .models import QCFSUNet2DModel

THRESHOLD_INITS = ("percentile", "mse")

OFFSET_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Candidate offsets of the MSE init, as fractions of the activation's lowest value over the site's inputs."""


class SiteObserver:
    """Keeps up to ``max_values`` randomly chosen inputs of one site, per channel (``(C, n)``)."""

    def __init__(self, max_values: int, generator: torch.Generator):
        self.max_values = max_values
        self.generator = generator
        self.chunks: list[torch.Tensor] = []
        self.count = 0

    def __call__(self, unit: QCFSActivation | SignedQCFS, z: torch.Tensor) -> None:
        dim = -1 if unit.channels_last else 1  # token-major inputs (transformer blocks, attention projections)
        values = z.detach().movedim(dim, 0).reshape(z.shape[dim], -1).float().cpu()
        keep = min(values.shape[1], max(1, self.max_values // 4))
        index = torch.randperm(values.shape[1], generator=self.generator)[:keep]
        self.chunks.append(values[:, index])
        self.count += values.shape[1]

    def values(self) -> torch.Tensor | None:
        """The kept inputs, ``(C, n)`` with ``n`` at most ``max_values`` (``None`` if it saw none)."""
        if not self.chunks:
            return None
        values = torch.cat(self.chunks, dim=1)
        if values.shape[1] > self.max_values:
            index = torch.randperm(values.shape[1], generator=self.generator)[: self.max_values]
            values = values[:, index]
        return values


class GroupedSiteObserver:
    """A :class:`SiteObserver` per timestep group of a site with a threshold table: each sample's input goes to
    the observer of its group (the unit's ``group_index``)."""

    def __init__(self, groups: int, max_values: int, generator: torch.Generator):
        self.groups = [SiteObserver(max_values, generator) for _ in range(groups)]

    def __call__(self, unit: QuantizerUnit, z: torch.Tensor) -> None:
        index = unit.group_index
        if index is None or index.shape[0] != z.shape[0]:
            raise RuntimeError("A site with timestep-aware thresholds was called without one group per sample.")
        for group, observer in enumerate(self.groups):
            mask = index == group
            if bool(mask.any()):
                observer(unit, z[mask])


@torch.no_grad()
def _observe(qnet: QCFSUNet2DModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]], make_observer) -> dict:
    """Run the original network on the batches with ``make_observer(unit)`` watching every QCFS unit."""
    units = {name: unit for name, unit in qnet.sites().items() if isinstance(unit, QuantizerUnit)}
    observers = {name: make_observer(unit) for name, unit in units.items()}
    for name, unit in units.items():
        unit.observers.append(observers[name])
    try:
        with qnet.as_ann():
            for sample, timestep, kwargs in batches:
                qnet(sample, timestep, **kwargs)
    finally:
        for unit in units.values():
            unit.observers.clear()
    return observers


def collect_site_inputs(
    qnet: QCFSUNet2DModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]],
    max_values: int = 4096,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Run the original network on ``(sample, timestep, kwargs)`` batches; return each site's inputs as ``(C, n)``."""
    generator = torch.Generator().manual_seed(seed)
    observers = _observe(qnet, batches, lambda unit: SiteObserver(max_values, generator))
    return {name: observer.values() for name, observer in observers.items()}


def collect_group_site_inputs(
    qnet: QCFSUNet2DModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]],
    max_values: int = 4096,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """As :func:`collect_site_inputs`, per timestep group of a model with threshold tables: element g maps each
    site to the inputs of the samples in group g (``(C, n_g)``; sites without a table, and groups no batch
    reached, are left out)."""
    generator = torch.Generator().manual_seed(seed)
    groups = int(qnet.config.threshold_groups)

    observers = _observe(qnet, batches, lambda unit: GroupedSiteObserver(table_groups(unit), max_values, generator))
    by_group: list[dict[str, torch.Tensor]] = [{} for _ in range(groups)]
    for name, observer in observers.items():
        for group, part in enumerate(observer.groups):
            values = part.values()
            if values is not None:
                by_group[group][name] = values
    return by_group


def percentile_threshold(
    values: torch.Tensor, percentile: float = 99.9, per_channel: bool = False, signed: bool = False
) -> torch.Tensor:
    """The ``percentile`` of the positive inputs (of the magnitudes if ``signed``), per channel (``(C,)``) or
    for the whole site (``(1,)``)."""
    q = percentile / 100.0
    magnitude = values.abs() if signed else values.clamp_min(0)
    if per_channel:
        return torch.quantile(magnitude, q, dim=1).clamp_min(MIN_THRESHOLD)
    return torch.quantile(magnitude.flatten(), q).reshape(1).clamp_min(MIN_THRESHOLD)


def mse_threshold(
    values: torch.Tensor,
    activation: torch.nn.Module,
    levels: int,
    phi: float = 0.5,
    per_channel: bool = False,
    num_candidates: int = 64,
    signed: bool = False,
) -> torch.Tensor:
    """The threshold minimising ``mean((qcfs(z) - activation(z))^2)`` over a grid of candidates
    (``signed_qcfs`` if ``signed``).

    Candidates run from 1 % to 100 % of the largest input (of the largest magnitude if ``signed``), per
    channel or for the whole site.
    """
    data = values.t() if per_channel else values.reshape(-1, 1)  # (n, C): channels on dim 1
    target = activation(data)
    quantizer = signed_qcfs if signed else qcfs
    top = (data.abs() if signed else data).amax(dim=0).clamp_min(MIN_THRESHOLD)
    best_error = torch.full_like(top, float("inf"))
    best = top.clone()
    for fraction in torch.linspace(0.01, 1.0, num_candidates):
        lam = top * fraction
        error = (quantizer(data, lam, levels, phi) - target).pow(2).mean(dim=0)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, lam, best)
    return best.clamp_min(MIN_THRESHOLD)


def quantization_error(values: torch.Tensor, unit: QCFSActivation | SignedQCFS, group: int | None = None) -> float:
    """Mean squared difference between the site's QCFS output and its original activation (with a threshold
    table: at the thresholds of ``group``)."""
    lam = unit.threshold.detach().float().clamp_min(MIN_THRESHOLD)
    if lam.dim() == 2:
        if group is None:
            raise ValueError("This site has timestep-aware thresholds; pass the group its inputs belong to.")
        lam = lam[group]
    z = values.t()  # (n, C): channels on dim 1, as the unit expects
    if getattr(unit, "output_offset", None) is not None:
        shift, offset = (broadcast_channels(p.detach(), z) for p in (unit.input_shift, unit.output_offset))
        return float((qcfs(z - shift, lam, unit.levels, unit.phi) + offset - unit.original(z)).pow(2).mean())
    quantizer = signed_qcfs if isinstance(unit, SignedQCFS) else qcfs
    return float((quantizer(z, lam, unit.levels, unit.phi) - unit.original(z)).pow(2).mean())


@torch.no_grad()
def init_thresholds(
    qnet: QCFSUNet2DModel,
    site_inputs: dict[str, torch.Tensor],
    method: str = "percentile",
    percentile: float = 99.9,
    group_inputs: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    """Set every QCFS unit's threshold from its collected inputs (``method``: percentile or mse), and with
    its input shift and output offset where it has them.

    A site with a table of K timestep-aware thresholds sets row g from ``group_inputs[g]`` (see
    :func:`collect_group_site_inputs`); a group without inputs, and a channel without a positive one in it,
    takes the threshold from all of ``site_inputs``.
    """
    if method not in THRESHOLD_INITS:
        raise ValueError(f"Unknown threshold init {method!r}; choose one of {THRESHOLD_INITS}.")
    for name, unit in qnet.sites().items():
        if name not in site_inputs:
            continue
        if getattr(unit, "output_offset", None) is not None:  # one threshold table row: refused with K > 1
            _init_with_offset(unit, site_inputs[name], method, percentile)
            continue
        lam = _unit_threshold(site_inputs[name], unit, method, percentile)
        if unit.threshold.dim() == 2:
            rows = [
                _unit_threshold(part[name], unit, method, percentile, fallback=lam)
                if group_inputs and name in part
                else lam
                for part in (group_inputs or [{}] * table_groups(unit))
            ]
            lam = torch.stack(rows)
        unit.threshold.copy_(lam.to(unit.threshold))


def _unit_threshold(
    values: torch.Tensor,
    unit: QCFSActivation | SignedQCFS,
    method: str,
    percentile: float,
    fallback: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unit's threshold from ``values``. A channel that never sees a positive input (any non-zero one, for a
    signed encoder) has no scale of its own: it takes ``fallback`` if given, else the site's."""
    dead = (values.abs() if isinstance(unit, SignedQCFS) else values).amax(dim=1) <= 0
    if fallback is not None and bool(dead.all()):
        return fallback
    lam = _site_threshold(values, unit, method, percentile, unit.per_channel)
    if unit.per_channel and dead.any():
        other = fallback if fallback is not None else _site_threshold(values, unit, method, percentile, False)
        lam = torch.where(dead, other, lam)
    return lam


def _site_threshold(
    values: torch.Tensor, unit: QCFSActivation | SignedQCFS, method: str, percentile: float, per_channel: bool
) -> torch.Tensor:
    signed = isinstance(unit, SignedQCFS)
    if method == "percentile":
        return percentile_threshold(values, percentile, per_channel, signed)
    return mse_threshold(values, unit.original, unit.levels, unit.phi, per_channel, signed=signed)


def lowest_activation(values: torch.Tensor, activation: torch.nn.Module, per_channel: bool = False) -> torch.Tensor:
    """The lowest value of ``activation`` over a site's inputs ``(C, n)``, at most 0, per channel (``(C,)``)
    or for the whole site (``(1,)``): the offset that lets a unit reach the activation's negative lobe."""
    outputs = activation(values)
    lowest = outputs.amin(dim=1) if per_channel else outputs.amin().reshape(1)
    return lowest.clamp_max(0)


def offset_fit(
    values: torch.Tensor, unit: QCFSActivation, method: str, percentile: float, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, offset)`` of a unit with offsets (shift = offset), per channel or for the whole site."""
    lowest = lowest_activation(values, unit.original, per_channel)
    best_lam = best_offset = best_error = None
    for fraction in OFFSET_FRACTIONS if method == "mse" else (1.0,):
        offset = lowest * fraction
        shifted = values - offset.reshape(-1, 1)  # (C, n) minus one value per channel, or one for the site
        if method == "percentile":
            return percentile_threshold(shifted, percentile, per_channel), offset

        def target(data: torch.Tensor, offset: torch.Tensor = offset) -> torch.Tensor:
            return unit.original(data + offset) - offset  # what qcfs(z - offset) must approximate

        lam = mse_threshold(shifted, target, unit.levels, unit.phi, per_channel)
        data = shifted.t() if per_channel else shifted.reshape(-1, 1)
        error = (qcfs(data, lam, unit.levels, unit.phi) - target(data)).pow(2).mean(dim=0)
        if best_error is None:
            best_lam, best_offset, best_error = lam, offset, error
            continue
        better = error < best_error
        best_lam = torch.where(better, lam, best_lam)
        best_offset = torch.where(better, offset, best_offset)
        best_error = torch.where(better, error, best_error)
    return best_lam, best_offset


def _init_with_offset(unit: QCFSActivation, values: torch.Tensor, method: str, percentile: float) -> None:
    lam, offset = offset_fit(values, unit, method, percentile, unit.per_channel)
    if unit.per_channel:
        # A channel whose shifted input is never positive has no scale of its own: it takes the site's.
        dead = (values - offset.reshape(-1, 1)).amax(dim=1) <= 0
        if dead.any():
            site_lam, site_offset = offset_fit(values, unit, method, percentile, False)
            lam, offset = torch.where(dead, site_lam, lam), torch.where(dead, site_offset, offset)
    unit.threshold.copy_(lam.to(unit.threshold))
    unit.input_shift.copy_(offset.to(unit.input_shift))
    unit.output_offset.copy_(offset.to(unit.output_offset))
