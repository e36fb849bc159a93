"""What a conversion did, for reports: sites by kind, the range of the thresholds, the real-valued ops."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import torch

from .models import QCFSUNet2DModel, SpikingUNet2DModel
from .neurons import IFNeuron, TernaryIFEncoder
from .sites import site_wiring
from .temporal import TemporalOp

SITE_KINDS = ("spatial IF", "time-embedding IF", "analog QCFS", "ternary IF encoder")
"""The kinds of site a conversion summary counts; the encoders (residual spikes) only when present."""


def conversion_summary(qnet: QCFSUNet2DModel, snn: SpikingUNet2DModel) -> dict[str, Any]:
    """What the conversion did: sites by kind, the range of the thresholds lambda, and the real-valued ops.

    Residual input encoders, where there are any, are counted as ``"ternary IF encoder"`` sites. A model with
    offsets also gets ``"offsets"``: the range of its output offsets and input shifts."""
    wiring = site_wiring(snn.unet)
    kinds = Counter()
    for name, unit in snn.sites().items():
        if isinstance(unit, TernaryIFEncoder):
            kinds["ternary IF encoder"] += 1
        elif isinstance(unit, IFNeuron):
            kinds["time-embedding IF" if wiring[name][1].kind == "temb" else "spatial IF"] += 1
        else:
            kinds["analog QCFS"] += 1
    lambdas = torch.cat([value.flatten().float().cpu() for value in qnet.thresholds().values()]).tolist()
    ops = Counter(type(module.op).__name__ for module in snn.unet.modules() if isinstance(module, TemporalOp))
    summary = {
        "sites": {kind: kinds[kind] for kind in SITE_KINDS if kind in kinds or kind in SITE_KINDS[:3]},
        "thresholds": {
            "min": min(lambdas),
            "median": statistics.median(lambdas),
            "max": max(lambdas),
            "count": len(lambdas),
            "per_channel": bool(qnet.config.per_channel),
        },
        "nonlinear_ops": dict(sorted(ops.items())),
        "nonlinear_mode": snn.config.nonlinear_mode,
        "tsm": _tsm_summary(snn),
    }
    if qnet.config.get("offsets", False):
        summary["offsets"] = _offsets_summary(qnet)
    return summary


def _offsets_summary(qnet: QCFSUNet2DModel) -> dict[str, Any]:
    """The range of the output offsets and input shifts of a QCFS model with offsets."""
    units = [unit for unit in qnet.sites().values() if getattr(unit, "output_offset", None) is not None]
    summary = {}
    for key, attr in (("offset", "output_offset"), ("shift", "input_shift")):
        values = torch.cat([getattr(unit, attr).detach().flatten().float().cpu() for unit in units])
        summary[f"{key}_min"], summary[f"{key}_max"] = values.min().item(), values.max().item()
    return summary


def _tsm_summary(snn: SpikingUNet2DModel) -> dict[str, Any]:
    """Whether the neurons carry temporal factors (TSM), and the range of those factors per time step."""
    factors = [
        n.temporal_factors.detach().float().cpu() for n in snn.neurons().values() if n.temporal_factors is not None
    ]
    if not factors:
        return {"enabled": False}
    stacked = torch.stack(factors)
    return {"enabled": True, "min_per_step": stacked.amin(0).tolist(), "max_per_step": stacked.amax(0).tolist()}
