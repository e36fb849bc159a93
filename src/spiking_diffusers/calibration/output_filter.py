"""Fit a model's output filter (:mod:`spiking_diffusers.converter.output_filter`) in closed form.

Each range of the schedule gets the linear least-squares filter from ``[prediction, sample]`` to the original
model's noise prediction, over the calibration set's inputs in that range. Least squares has an exact solution
here (a few hundred unknowns per range), so no gradient steps: the normal equations are summed batch by batch
in float64 (memory independent of the set size) and solved once per range. Under several processes each
fits its round-robin share of the batches and the sums are all-reduced before the solve (sums of per-input
terms: the same fit as one process, up to the order of float additions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed
from ..converter.models import QCFSUNet2DModel, SpikingUNet2DModel
from ..converter.probes import move_kwargs
from .data import CalibrationSet

FIT_INPUTS = 1024
"""The calibration inputs the filter is fitted on, spread evenly over the schedule: a few hundred unknowns per
range against thousands of pixels per input, so a quarter of the default set fits it as well as the whole set
and runs the SNN over a quarter of it (docs/calibration.md, "The output filter")."""

RIDGE = 1e-6
"""Tikhonov term, relative to the mean diagonal of the normal matrix: keeps a range with few inputs (or
constant borders) solvable without changing a well-posed fit."""


def _rows(model: QCFSUNet2DModel | SpikingUNet2DModel, prediction: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The least-squares design: one row per output pixel, the k x k patch of ``[prediction, sample]`` and a 1."""
    flt = model.output_filter
    patches = F.unfold(flt.filter_inputs(prediction, sample).double(), flt.kernel_size)  # (N, D - 1, H * W)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return torch.cat([patches, torch.ones(len(patches), 1, dtype=patches.dtype, device=patches.device)], 1)


@torch.no_grad()
def fit_output_filter(
    model: QCFSUNet2DModel | SpikingUNet2DModel,
    calibration_set: CalibrationSet,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    max_inputs: int | None = FIT_INPUTS,
) -> dict[str, Any]:
    """Fit ``model.output_filter`` to ``calibration_set``'s targets (the original model's noise predictions) from
    the model's own unfiltered predictions, on at most ``max_inputs`` of its inputs (see :func:`fit_indices`;
    ``None``: all); return the report: per range, the inputs it saw and the relative error of the prediction
    before and after the filter (on those inputs). ``on_batch`` counts this process's inputs."""
    flt = model.output_filter
    if flt is None:
        raise ValueError("This model has no output filter; add one with model.set_output_filter(kernel_size).")
    if calibration_set.targets is None:
        raise ValueError("The calibration set has no targets; label it with the original model first.")
    param = next(model.parameters())
    size = flt.weight[0].numel() // flt.out_channels + 1
    normal = torch.zeros(flt.groups, size, size, dtype=torch.float64)
    moment = torch.zeros(flt.groups, size, flt.out_channels, dtype=torch.float64)
    counts = torch.zeros(flt.groups, dtype=torch.float64)  # float: summed over processes with the sums above
    model.eval()
    chosen_inputs = fit_indices(calibration_set, max_inputs)
    batches = [
        chosen_inputs[share.start : share.stop] for share in distributed.my_batches(len(chosen_inputs), batch_size)
    ]
    predictions = []
    for batch in batches:
        x = calibration_set.x_t[batch].to(param.device, param.dtype)
        t = calibration_set.timesteps[batch].to(param.device)
        kwargs = move_kwargs({key: value[batch] for key, value in calibration_set.conditions.items()}, param)
        with model.output_filter_disabled():
            prediction = model(x, t, **kwargs).sample
        predictions.append(prediction.cpu())
        target = calibration_set.targets[batch].double()
        rows = _rows(model, prediction, x).cpu().view(len(x), -1, size)
        targets = target.permute(0, 2, 3, 1).reshape(len(x), -1, flt.out_channels)
        group = flt.group_index(t, len(x), t.device).cpu()
        for g in group.unique().tolist():
            chosen = group == g
            a, y = rows[chosen].reshape(-1, size), targets[chosen].reshape(-1, flt.out_channels)
            normal[g] += a.T @ a
            moment[g] += a.T @ y
            counts[g] += int(chosen.sum())
        if on_batch is not None:
            on_batch(len(x))
    distributed.all_reduce_sum([normal, moment, counts])
    for g in range(flt.groups):
        if counts[g] == 0:  # no input in this range: it keeps the identity
            continue
        ridge = RIDGE * normal[g].diagonal().mean() * torch.eye(size, dtype=torch.float64)
        solution = torch.linalg.solve(normal[g] + ridge, moment[g])  # (size, out)
        flt.weight[g] = solution[:-1].T.reshape(flt.weight.shape[1:]).to(flt.weight)
        flt.bias[g] = solution[-1].to(flt.bias)
    return _report(model, calibration_set, predictions, counts, batches)


def fit_indices(calibration_set: CalibrationSet, max_inputs: int | None) -> torch.Tensor:
    """Which inputs of ``calibration_set`` a fit of at most ``max_inputs`` uses: all of them, or every k-th in
    the order of their timesteps, an even spread over the schedule (the set's timesteps are stratified)."""
    if max_inputs is not None and max_inputs < 1:
        raise ValueError(f"max_inputs must be at least 1 (or None: every input), got {max_inputs}.")
    if max_inputs is None or max_inputs >= len(calibration_set):
        return torch.arange(len(calibration_set))
    order = torch.argsort(calibration_set.timesteps, stable=True)
    return order[torch.linspace(0, len(order) - 1, max_inputs).round().long()]


@torch.no_grad()
def _report(model, calibration_set: CalibrationSet, predictions: list, counts, batches: tuple) -> dict:
    """Per range: inputs, and the mean relative error of the prediction before / after the fitted filter."""
    flt = model.output_filter
    before = torch.zeros(flt.groups, dtype=torch.float64)
    after = torch.zeros(flt.groups, dtype=torch.float64)
    param = next(model.parameters())
    for batch, prediction in zip(batches, predictions, strict=True):
        x = calibration_set.x_t[batch].to(param.device, param.dtype)
        t = calibration_set.timesteps[batch].to(param.device)
        prediction, target = prediction.to(x), calibration_set.targets[batch].to(x)
        filtered = flt(prediction, x, t)
        norm = target.flatten(1).norm(dim=1).clamp_min(1e-12)
        group = flt.group_index(t, len(x), t.device).cpu()
        before.index_add_(0, group, ((prediction - target).flatten(1).norm(dim=1) / norm).double().cpu())
        after.index_add_(0, group, ((filtered - target).flatten(1).norm(dim=1) / norm).double().cpu())
    distributed.all_reduce_sum([before, after])
    seen = counts.clamp_min(1)
    length = flt.schedule_length
    return {
        "kernel_size": flt.kernel_size,
        "groups": [
            {
                "timesteps": [-(-g * length // flt.groups), -(-(g + 1) * length // flt.groups) - 1],
                "inputs": int(counts[g]),
                "relative_error_before": round(float(before[g] / seen[g]), 5),
                "relative_error_after": round(float(after[g] / seen[g]), 5),
            }
            for g in range(flt.groups)
        ],
    }
