"""Quantization clip-floor-shift (QCFS) activation units (Bu et al., ICLR 2022).

A QCFS unit replaces one activation *call site* of the original network:

    a(z) = lambda / L * clip(floor(z * L / lambda + phi), 0, L)

It is the function whose expectation an integrate-and-fire neuron with threshold ``lambda`` and initial
membrane ``phi * lambda`` reproduces, which is what makes the later conversion to spikes nearly lossless.
"""

from __future__ import annotations

import torch
from torch import nn

from .timestep_groups import group_thresholds

MIN_THRESHOLD = 1e-4
"""The smallest threshold lambda any unit or neuron uses: thresholds are clamped to it where they are used,
and calibration clamps the parameters themselves to it after every step, so a threshold never reaches 0."""


class _ClipFloor(torch.autograd.Function):
    """``lam / L * clamp(floor(z * L / lam + phi), low, L)`` with straight-through gradients, in a few passes.

    Autograd's graph of the same expression (a floor with a detached residual, a clamp, a division) runs about
    twenty passes over the tensor in forward and backward, several of them boolean masks, which are slow on
    CPUs: most of the elementwise work of a distillation step. This saves one float mask and one float tensor
    and computes the same values, and the same gradients to float rounding, in a third to a half of the time.
    Hand-written because torch has no fused kernel for it and compiling one (``torch.compile``) costs minutes.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, lam: torch.Tensor, levels: int, phi: float, low: int) -> torch.Tensor:
        scaled = z * levels
        scaled.div_(lam)  # z * L / lam, rounded as the plain expression rounds it
        level = (scaled + phi).floor_()
        clipped = level.clamp(low, levels)
        # 1 where the level is inside [low, L] (the clamp passed it), else 0: levels are integers, so
        # 1 - |level - clipped| is 1 or at most 0; float arithmetic instead of a slow boolean mask.
        inside = level.sub_(clipped).abs_().neg_().add_(1).clamp_(min=0)
        ctx.levels, ctx.lam_shape = levels, lam.shape
        if ctx.needs_input_grad[1]:
            # d a / d lam = (clipped - inside * z * L / lam) / L: 0..1 where saturated, the quantization error inside.
            ctx.save_for_backward(inside, clipped - scaled.mul_(inside))
        else:
            ctx.save_for_backward(inside)
        return clipped.mul_(lam / levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inside = ctx.saved_tensors[0]
        grad_z = grad * inside if ctx.needs_input_grad[0] else None
        grad_lam = None
        if ctx.needs_input_grad[1]:
            grad_lam = (grad * ctx.saved_tensors[1]).sum_to_size(ctx.lam_shape) / ctx.levels
        return grad_z, grad_lam, None, None, None


def clip_floor(z: torch.Tensor, lam: torch.Tensor, levels: int, phi: float, low: int) -> torch.Tensor:
    """``lam / L * clamp(floor(z * L / lam + phi), low, L)``; straight-through gradients where autograd needs
    them (``d/dz`` is 1 where the level is inside ``[low, L]``, 0 where it saturates). ``lam`` broadcasts
    against ``z``. Without gradients (sampling, export) it is the plain expression, with the same values."""
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or lam.requires_grad)
    if needs_grad and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        return _ClipFloor.apply(z, lam, levels, phi, low)
    return lam / levels * torch.clamp(torch.floor(z * levels / lam + phi), low, levels)


def qcfs(
    z: torch.Tensor, threshold: torch.Tensor, levels: int, phi: float = 0.5, channels_last: bool = False
) -> torch.Tensor:
    """The QCFS function with straight-through gradients.

    ``d a / d z`` is 1 inside ``(-phi * lambda / L, (L - phi) * lambda / L)`` and 0 outside; ``lambda``
    gets 1 where the unit saturates and the LSQ-style quantization-error gradient inside the range.
    ``threshold`` broadcasts against ``z`` on the channel dimension (dim 1, or the last with ``channels_last``)
    when it has one value per channel.
    """
    return clip_floor(z, broadcast_channels(threshold, z, channels_last), levels, phi, 0)


def broadcast_channels(values: torch.Tensor, like: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A per-channel vector (or a single value) shaped, in ``like``'s dtype, to broadcast against ``like`` on
    its channel dim: dim 1, or the last dim with ``channels_last`` (token-major ``(B, N, C)`` inputs). A 2-d
    ``values`` holds one row per sample of ``like`` (timestep-aware thresholds: ``(B, C)`` or ``(B, 1)``)."""
    if values.dim() == 2:
        rows = values.to(like.dtype)
        ones = [1] * (like.dim() - 2)
        return rows.reshape(rows.shape[0], *ones, rows.shape[1]) if channels_last else rows.reshape(*rows.shape, *ones)
    if values.numel() == 1:
        return values.reshape(()).to(like.dtype)
    if channels_last:
        return values.to(like.dtype)  # (C,) broadcasts on the last dim as it is
    return values.reshape(1, -1, *([1] * (like.dim() - 2))).to(like.dtype)


class QuantizerUnit(nn.Module):
    """What a QCFS unit and a signed QCFS encoder share: a trainable threshold (one, or one per channel),
    ``levels`` and ``phi``, the ``original`` function (``mode = "ann"`` runs it instead of the quantizer),
    and ``observers``, called with every input (activation statistics). Subclasses define :meth:`quantize`.
    A model with timestep-aware thresholds makes ``threshold`` a ``(K, C)`` table and sets ``group_index``
    (each sample's row) around every call (see :mod:`.timestep_groups`). ``channels_last`` marks token-major
    inputs ``(B, N, C)`` (transformer blocks, attention projections); others have channels on dim 1.
    """

    def __init__(
        self,
        original: nn.Module,
        channels: int,
        levels: int,
        phi: float,
        per_channel: bool,
        channels_last: bool = False,
    ):
        super().__init__()
        if levels < 1:
            raise ValueError(f"QCFS needs at least 1 quantization level, got levels={levels}.")
        self.original = original
        self.channels = channels
        self.levels = int(levels)
        self.phi = float(phi)
        self.per_channel = bool(per_channel)
        self.channels_last = bool(channels_last)
        self.threshold = nn.Parameter(torch.ones(channels if per_channel else 1))
        self.mode = "qcfs"
        self.observers: list = []
        self.group_index: torch.Tensor | None = None

    def quantize(self, z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """The unit's quantizer at ``threshold`` (already clamped to :data:`MIN_THRESHOLD`)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for observer in self.observers:
            observer(self, z)
        if self.mode == "ann":
            return self.original(z)
        return self.quantize(z, group_thresholds(self.threshold, self.group_index).clamp_min(MIN_THRESHOLD))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, phi={self.phi}, channels={self.channels}, per_channel={self.per_channel}"


class QCFSActivation(QuantizerUnit):
    """One activation call site turned into a QCFS unit with its own trainable threshold.

    The original activation is kept (it has no parameters) so that the same network can run as the
    original ANN (``mode = "ann"``), which calibration uses as its teacher and for statistics.

    With ``offsets`` the unit also learns an input shift and an output offset (one per site, or per channel
    with ``per_channel``), so that its range can reach below 0 like SiLU's negative lobe:
    ``a(z) = qcfs(z - input_shift) + output_offset``. Both start at 0 (the unit without them); in the
    spiking network the shift is a constant bias current of the neuron and the offset a constant bias map
    of the consumer layer (see :mod:`~spiking_diffusers.converter.offsets`).
    """

    def __init__(
        self,
        original: nn.Module,
        channels: int,
        levels: int,
        phi: float = 0.5,
        per_channel: bool = False,
        tsm_steps: int = 0,
        offsets: bool = False,
        channels_last: bool = False,
    ):
        super().__init__(original, channels, levels, phi, per_channel, channels_last)
        # Temporal factors (TSM) the spiking network was fine-tuned with; unused by the QCFS function itself,
        # kept here so a calibrated QCFS model converts back into the same spiking network.
        self.temporal_factors = nn.Parameter(torch.ones(tsm_steps)) if tsm_steps else None
        size = channels if per_channel else 1
        self.input_shift = nn.Parameter(torch.zeros(size)) if offsets else None
        self.output_offset = nn.Parameter(torch.zeros(size)) if offsets else None

    def quantize(self, z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """:func:`qcfs` at ``threshold`` (of ``z - input_shift``, plus ``output_offset``, with offsets)."""
        if self.input_shift is None:
            return qcfs(z, threshold, self.levels, self.phi, self.channels_last)
        shifted = z - broadcast_channels(self.input_shift, z, self.channels_last)
        offset = broadcast_channels(self.output_offset, z, self.channels_last)
        return qcfs(shifted, threshold, self.levels, self.phi, self.channels_last) + offset

    def extra_repr(self) -> str:
        offsets = ", offsets=True" if self.input_shift is not None else ""
        return f"{super().extra_repr()}, original={type(self.original).__name__}{offsets}"


def set_tsm_steps(model: nn.Module, steps: int) -> None:
    """Give every QCFS unit of ``model`` temporal factors for ``steps`` time steps (0: remove them).

    Existing factors of the right length are kept; new ones start at 1 (no effect).
    """
    for unit in model.modules():
        if not isinstance(unit, QCFSActivation):
            continue
        current = unit.temporal_factors
        if steps == 0:
            unit.temporal_factors = None
        elif current is None or current.numel() != steps:
            unit.temporal_factors = nn.Parameter(
                torch.ones(steps, device=unit.threshold.device, dtype=unit.threshold.dtype)
            )
