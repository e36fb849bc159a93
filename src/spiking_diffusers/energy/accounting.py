"""Operation counting on a real forward pass: which weight layers are driven by spikes, and how much work
every layer does.

One :class:`OperationCounter` watches a model while it runs. It tags every tensor an IF neuron emits, and
intercepts the torch functions that do arithmetic work (``conv2d``, ``linear``, the attention products,
``softmax``, ``group_norm``) through a ``TorchFunctionMode``, so functional calls (FIR resampling, the
attention processor's matmuls) are seen as well as modules. Intercepting functions rather than hooking
layer types means no layer can be skipped silently. Each call is attributed to the innermost module that
made it. A weight layer whose input is a tagged spike tensor is *spike-driven* and costs accumulates (ACs):
one per input spike per synapse it reaches. Every other call costs multiply-accumulates (MACs).

Counting rules:

- Spikes are the non-zero entries of a neuron's output: ``lambda`` (threshold form ``"lambda"``), 1 (form
  ``"unit"``), negative for signed neurons and for the ternary input encoders of residual spikes; each
  counts once, so the count is ``sum |s|``; a burst neuron's k spikes in one step count k times. In batched
  execution a layer sees all T time steps folded into the batch, so counts cover all T steps. Before a
  tagged tensor is counted as spikes its values are checked to be 0 or +-amplitude.
- ACs of a spike-driven convolution are exact for any padding, stride, dilation and groups: the sum, over
  output positions and output channels, of the input spikes inside the receptive field (a convolution of
  the spike indicator with an all-ones kernel). For a linear layer, each spike reaches ``out_features``.
- MACs of a dense convolution: output elements x kernel size x in_channels / groups; of a linear layer:
  output elements x in_features; of a matrix product: its multiply count. Element-wise work is counted in
  MAC-equivalents per element: GroupNorm and LayerNorm ``GROUPNORM_OPS``, softmax ``SOFTMAX_OPS``, GEGLU's
  gate product one per output element (real values times real values, in the ANN and the SNN alike), and
  the expectation compensation of a ``TemporalOp`` ``COMPENSATION_OPS`` per input element.
- Delta spikes (``delta_spikes=True``, a spiking model's option): a link from a neuron to a weight layer
  transmits, at each time step, the *change* of the neuron's spike count from the same time step of the
  previous UNet evaluation (signed spikes), and the layer keeps its T input currents of that evaluation and
  adds the weights times the change: ``W k_n = W k_{n-1} + W (k_n - k_{n-1})``, exact because the layer is
  linear. A spike-driven layer then costs ``|k_n - k_{n-1}|`` accumulates per synapse instead of ``|k_n|``.
  Where the change holds more spikes than ``k_n`` itself (an input that changed a lot), that sample's input
  at that time step is sent in full after the layer clears the currents it kept: the count is the smaller
  of the two, per sample and time step. The first evaluation of a counted run, and any whose input shape
  differs from the last one's, count in full. The simulation computes ``W k_n`` directly (the same
  function), so only the count changes here.
- Not counted, in the SNN and the ANN alike: biases, residual additions, activation functions (ANN) and
  membrane updates (SNN), the sinusoidal time embedding, nearest / average resampling. The output offsets
  of a model with ``offsets`` are bias maps of the consumer layers (model constants, computed once per input
  shape inside ``constant_work``, which is not counted): left out like biases, one addition per output
  element; the consumer still reads spikes and costs ACs. Their input shifts are bias currents of the
  neurons, part of the membrane update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from torch import nn
from torch.overrides import TorchFunctionMode

from ..converter.encoded_attention import AttentionCore
from ..converter.gated import GateProduct
from ..converter.neurons import IFNeuron, TernaryIFEncoder
from ..converter.offsets import computing_constants
from ..converter.sites import site_units
from ..converter.temporal import TemporalOp

GROUPNORM_OPS = 4
"""MAC-equivalents per element of GroupNorm (and LayerNorm): accumulate the mean, accumulate the variance,
normalise, affine."""

SOFTMAX_OPS = 3
"""MAC-equivalents per attention score of softmax: exponential, accumulate the sum, scale by its inverse."""

COMPENSATION_OPS = 4
"""MAC-equivalents per input element of expectation compensation: running sum, divide by t, multiply the
op's output by t, subtract the previous total (see ``TemporalOp``)."""

HELD_OPS = 2
"""MAC-equivalents per input element of a held step of a ``TemporalOp`` with fewer evaluations than time
steps: the running input sum and the running sum of what was emitted (the held value is re-emitted as is)."""

_SPIKE_TAG = "_sdm_spike_source"


OUTPUT_FILTER = "output_filter"
"""The layer name of a model's output filter (real-valued work after the UNet, once per forward)."""


@dataclass
class LayerCount:
    """Work of one operation of one module, summed over every call seen."""

    name: str
    op: str
    spike_driven: bool
    macs: int = 0
    acs: int = 0
    input_spikes: int = 0
    input_elements: int = 0

    @property
    def firing_rate(self) -> float | None:
        """Input spikes per neuron per time step (spike-driven layers only)."""
        if not self.spike_driven or not self.input_elements:
            return None
        return self.input_spikes / self.input_elements


@dataclass
class SiteRate:
    """Spikes emitted by one neuron layer, over every time step and sample seen."""

    name: str
    spikes: int = 0
    elements: int = 0

    @property
    def firing_rate(self) -> float:
        """Spikes per neuron per time step."""
        return self.spikes / self.elements if self.elements else 0.0


@dataclass
class Accounting:
    """What an :class:`OperationCounter` measured: per-layer counts, per-site firing rates, and how many
    samples went through the model (a UNet forward on a batch of B counts B)."""

    layers: dict[tuple[str, str], LayerCount] = field(default_factory=dict)
    sites: dict[str, SiteRate] = field(default_factory=dict)
    sample_forwards: int = 0

    @property
    def macs(self) -> int:
        """Multiply-accumulates over every layer."""
        return sum(layer.macs for layer in self.layers.values())

    @property
    def acs(self) -> int:
        """Accumulates (spike-driven synaptic operations) over every layer."""
        return sum(layer.acs for layer in self.layers.values())


def inner_unet(model: nn.Module) -> nn.Module:
    """The network that does the work: the ``unet`` of a QCFS / spiking model, else the model itself."""
    unet = getattr(model, "unet", None)
    return unet if isinstance(unet, nn.Module) else model


def module_names(unet: nn.Module) -> dict[int, str]:
    """Names under which each module's work is reported, identical for the ANN and the SNN: the module
    wrapped by a ``TemporalOp`` carries the wrapper's name, an IF neuron or QCFS unit its site name, and
    the core of an attention split for residual spikes (and its wrapper) the attention's name."""
    names, wrappers = {}, []
    for name, module in unet.named_modules():
        if isinstance(module, TemporalOp):
            wrappers.append(f"{name}.op")
        for wrapper in wrappers:
            if name == wrapper or name.startswith(wrapper + "."):
                name = wrapper[: -len(".op")] + name[len(wrapper) :]
        if isinstance(module.op if isinstance(module, TemporalOp) else module, AttentionCore):
            name = name.removesuffix(".core")
        names.setdefault(id(module), name or "unet")
    for site, unit in site_units(unet).items():
        names[id(unit)] = site
    return names


def _argument(args: tuple, kwargs: dict, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def spike_indicator(x: torch.Tensor) -> torch.Tensor | None:
    """The number of spikes at each entry of a tagged spike tensor (1 where a binary or ternary neuron fired,
    up to B for a burst neuron), as float64; ``None`` for a real-valued tensor.

    Raises if a tensor tagged as spikes holds anything but whole multiples of its neuron's spike amplitude
    (it was changed in place).
    """
    counts = signed_spike_counts(x)
    return None if counts is None else counts.abs()


def signed_spike_counts(x: torch.Tensor) -> torch.Tensor | None:
    """The signed spike count at each entry of a tagged spike tensor (negative for a signed neuron's negative
    spikes), as float64; ``None`` for a real-valued tensor. Checked as in :func:`spike_indicator`."""
    neuron = getattr(x, _SPIKE_TAG, None)
    if neuron is None:
        return None
    amplitude = neuron.amplitude(x).detach()
    finite = x.isfinite()  # a diverging network is reported by the sampler, not counted here
    counts = torch.where(finite, (x / amplitude).round(), 0)
    off = finite & ((x - counts * amplitude).abs() > 1e-4 * amplitude)
    if bool(off.any()) or bool((counts.abs() > neuron.spikes_per_step).any()):
        raise RuntimeError(
            "A tensor tagged as spikes holds values other than whole multiples of +-lambda (changed in place?)."
        )
    return counts.to(torch.float64)


def conv_acs(
    indicator: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, ...],
    padding: int | tuple[int, ...] | str,
    dilation: int | tuple[int, ...],
    groups: int,
) -> int:
    """Accumulates of a convolution on a spike map: for every output position and output channel, the
    spikes in its receptive field (exact at the borders, for any stride, padding, dilation and groups)."""
    channels = indicator.shape[1]
    per_group = indicator.unflatten(1, (groups, channels // groups)).sum(2)
    ones = torch.ones(groups, 1, *weight.shape[2:], dtype=torch.float64, device=indicator.device)
    reach = F.conv2d(per_group, ones, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return round(float(reach.sum())) * (weight.shape[0] // groups)


def _matmul_macs(a: torch.Size, b: torch.Size) -> int:
    """Multiplies of ``a @ b`` with broadcasting batch dimensions (1-d operands as in ``torch.matmul``)."""
    a = (1, *a) if len(a) == 1 else tuple(a)
    b = (*b, 1) if len(b) == 1 else tuple(b)
    batch = torch.broadcast_shapes(a[:-2], b[:-2])
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


class OperationCounter(TorchFunctionMode):
    """Counts the work of every forward pass of ``model`` run inside ``with OperationCounter(model) as c``.

    ``model`` is a ``UNet2DModel``, :class:`~spiking_diffusers.QCFSUNet2DModel`,
    :class:`~spiking_diffusers.SpikingUNet2DModel` or any module whose first argument is a batch; the
    result accumulates in ``c.accounting``. With ``delta_spikes`` each spike-driven layer costs the change of
    its input spikes from its call at the same place in the previous model forward (see the module's notes).
    """

    def __init__(self, model: nn.Module, delta_spikes: bool = False):
        super().__init__()
        self.model = model
        self.delta_spikes = bool(delta_spikes)
        # Delta spikes: each spike-driven layer call's input counts, by (layer, op, call number in the forward).
        self._previous: dict[tuple[str, str, int], torch.Tensor] = {}
        self._calls: dict[tuple[str, str], int] = {}
        self.unet = inner_unet(model)
        self.accounting = Accounting()
        self._names = module_names(self.unet)
        self._stack: list[str] = []
        self._hooks: list = []
        self._handlers: dict[Callable, Callable] = {
            F.conv2d: self._conv2d,
            F.linear: self._linear,
            F.scaled_dot_product_attention: self._attention,
            torch.bmm: self._bmm,
            torch.baddbmm: self._baddbmm,
            torch.matmul: self._bmm,
            torch.Tensor.matmul: self._bmm,
            torch.Tensor.__matmul__: self._bmm,
            F.softmax: self._softmax,
            torch.softmax: self._softmax,
            torch.Tensor.softmax: self._softmax,
            F.group_norm: self._group_norm,
            F.layer_norm: self._layer_norm,
            F.interpolate: self._interpolate,
        }

    def __enter__(self) -> OperationCounter:
        self._hooks.append(self.model.register_forward_pre_hook(self._count_samples, with_kwargs=True))
        for module in self.unet.modules():
            name = self._names[id(module)]
            self._hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self._stack.append(n)))
            self._hooks.append(module.register_forward_hook(self._leave, always_call=True))
            if isinstance(module, (IFNeuron, TernaryIFEncoder)):
                self._hooks.append(module.register_forward_hook(self._tag_spikes))
            elif isinstance(module, TemporalOp):
                self._hooks.append(module.register_forward_pre_hook(self._compensation))
            elif isinstance(module, (GateProduct, GEGLU)):  # the converted gate product, and the ANN's
                self._hooks.append(module.register_forward_hook(self._gate_product))
        output_filter = getattr(self.model, "output_filter", None)  # runs after the UNet, on real values
        if isinstance(output_filter, nn.Module):
            self._hooks.append(output_filter.register_forward_pre_hook(lambda *_: self._stack.append(OUTPUT_FILTER)))
            self._hooks.append(output_filter.register_forward_hook(self._leave, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._stack.clear()
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        handler = self._handlers.get(func)
        if handler is not None and not computing_constants():
            handler(args, kwargs, out)
        return out

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _layer(self, op: str, spike_driven: bool = False) -> LayerCount:
        name = self._stack[-1] if self._stack else "(top level)"
        layer = self.accounting.layers.get((name, op))
        if layer is None:
            layer = self.accounting.layers[(name, op)] = LayerCount(name, op, spike_driven)
        elif layer.spike_driven != spike_driven:
            raise RuntimeError(f"{name} ({op}) was fed spikes in some calls and real values in others.")
        return layer

    def _leave(self, *_) -> None:
        self._stack.pop()

    def _count_samples(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.accounting.sample_forwards += sample.shape[0]
        self._stack.clear()
        self._calls.clear()

    def _tag_spikes(self, neuron: IFNeuron | TernaryIFEncoder, args, out: torch.Tensor) -> None:
        setattr(out, _SPIKE_TAG, neuron)
        site = self._names[id(neuron)]
        rate = self.accounting.sites.setdefault(site, SiteRate(site))
        rate.spikes += round(float(spike_indicator(out).sum()))
        rate.elements += out.numel()

    def _compensation(self, op: TemporalOp, args) -> None:
        if op.method != "compensated":
            return
        evaluated = op.evaluated_steps()
        if op.execution == "batched":  # all T steps in one call
            per_step = args[0].numel() // op.num_steps
            held = op.num_steps - len(evaluated)
            macs = per_step * (COMPENSATION_OPS * len(evaluated) + HELD_OPS * held)
        else:  # one step per call; the op counts its steps itself, after this hook
            macs = args[0].numel() * (COMPENSATION_OPS if op.step + 1 in evaluated else HELD_OPS)
        self._layer("compensation").macs += macs

    # -- handlers: one per intercepted function ------------------------------------------------------------

    def _weight_layer(self, op: str, x: torch.Tensor, out: torch.Tensor, fan_in: int, acs: Callable) -> None:
        indicator = self._transmitted(op, x) if self.delta_spikes else spike_indicator(x)
        layer = self._layer(op, spike_driven=indicator is not None)
        if indicator is None:
            layer.macs += out.numel() * fan_in
            return
        layer.acs += acs(indicator)
        layer.input_spikes += round(float(indicator.sum()))
        layer.input_elements += x.numel()

    def _transmitted(self, op: str, x: torch.Tensor) -> torch.Tensor | None:
        """Delta spikes: the spikes a layer receives at this call, ``|k - k_previous|``, where ``k_previous`` is
        its input at the same call of the previous forward (``|k|`` without one of the same shape)."""
        counts = signed_spike_counts(x)
        if counts is None:
            return None
        layer = (self._stack[-1] if self._stack else "(top level)", op)
        call = self._calls[layer] = self._calls.get(layer, -1) + 1
        key = (*layer, call)
        previous = self._previous.get(key)
        self._previous[key] = counts.to(torch.int16)  # |k| <= B: small whole numbers
        full = counts.abs()
        if previous is None or previous.shape != counts.shape:
            return full
        # Each sample's input at each time step (a row of the batch, time folded in or not) goes the cheaper
        # way: as the change, or in full after the layer clears the currents it kept.
        delta = (counts - previous).abs()
        cheaper = delta.flatten(1).sum(1) < full.flatten(1).sum(1)
        return torch.where(cheaper.reshape(-1, *[1] * (counts.dim() - 1)), delta, full)

    def _conv2d(self, args, kwargs, out) -> None:
        x, weight = args[0], _argument(args, kwargs, 1, "weight")
        stride, padding, dilation, groups = (
            _argument(args, kwargs, 3, "stride", 1),
            _argument(args, kwargs, 4, "padding", 0),
            _argument(args, kwargs, 5, "dilation", 1),
            _argument(args, kwargs, 6, "groups", 1),
        )
        kernel = "x".join(str(k) for k in weight.shape[2:])
        self._weight_layer(
            f"conv{kernel}",
            x,
            out,
            fan_in=weight[0].numel(),
            acs=lambda ind: conv_acs(ind, weight, stride, padding, dilation, groups),
        )

    def _linear(self, args, kwargs, out) -> None:
        x, weight = args[0], _argument(args, kwargs, 1, "weight")
        fan_out = weight.shape[0]
        self._weight_layer("linear", x, out, fan_in=weight.shape[1], acs=lambda ind: round(float(ind.sum())) * fan_out)

    def _attention(self, args, kwargs, out) -> None:
        query, key, value = args[0], _argument(args, kwargs, 1, "key"), _argument(args, kwargs, 2, "value")
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        scores = math.prod(batch) * query.shape[-2] * key.shape[-2]
        self._layer("attention matmul").macs += scores * (query.shape[-1] + value.shape[-1])
        self._layer("softmax").macs += SOFTMAX_OPS * scores

    def _bmm(self, args, kwargs, out) -> None:
        # The output filter runs as patches times each sample's filter (a convolution in a batched matmul).
        op = "filter matmul" if self._stack[-1:] == [OUTPUT_FILTER] else "attention matmul"
        self._layer(op).macs += _matmul_macs(args[0].shape, args[1].shape)

    def _baddbmm(self, args, kwargs, out) -> None:
        self._layer("attention matmul").macs += _matmul_macs(args[1].shape, args[2].shape)

    def _softmax(self, args, kwargs, out) -> None:
        self._layer("softmax").macs += SOFTMAX_OPS * out.numel()

    def _group_norm(self, args, kwargs, out) -> None:
        self._layer("groupnorm").macs += GROUPNORM_OPS * out.numel()

    def _layer_norm(self, args, kwargs, out) -> None:
        self._layer("layernorm").macs += GROUPNORM_OPS * out.numel()

    def _gate_product(self, module: nn.Module, args, out: torch.Tensor) -> None:
        # Runs after the module's forward hook has left its name: attribute the product to the module itself.
        self._stack.append(self._names[id(module)])
        self._layer("gate product").macs += out.numel()
        self._stack.pop()

    def _interpolate(self, args, kwargs, out) -> None:
        """Nearest-neighbour resampling of a spike map yields spikes (each copy reaches its own synapses)."""
        source = getattr(args[0], _SPIKE_TAG, None)
        if source is not None and _argument(args, kwargs, 3, "mode", "nearest") == "nearest":
            setattr(out, _SPIKE_TAG, source)
