"""Input shifts and output offsets of the activation sites (the ``offsets`` option) in the spiking network.

A QCFS unit outputs values in ``[0, lambda]`` while SiLU reaches down to -0.28. With ``offsets`` every
activation unit of the QCFS network is

    a(z) = qcfs(z - shift; lambda) + offset

with ``shift`` and ``offset`` learned per site (or per channel). Neither makes a layer of the spiking
network read real values:

- the **shift** is a constant current subtracted from the neuron's input (a bias current: the neuron
  integrates ``z - shift``; in the unit-threshold form it is divided by lambda like the rest of the input);
- the **offset** belongs to the *consumer* layer. The neuron emits the spikes of the QCFS part alone; the
  consumer (a convolution or linear layer) reads them as before, and adds its response to a map holding the
  offset, without its own bias: ``conv(s + offset) = conv(s) + conv_nobias(offset * 1)``. That constant is
  computed by the layer's own convolution of a constant map, so it is exact at the zero-padded borders, and
  the map first passes the linear resampling between site and consumer where there is one
  (``SiteSpec.resample``: a ResNet block's up- or down-sampling, FIR kernels included).

The constant is a bias map, a property of the model: it is computed once per input shape and cached (while
the offset or the weights train it is recomputed on every forward, so gradients reach both), and applying it
costs one addition per output element, which the energy accounting leaves out as it leaves out biases. The
work of computing it runs inside :func:`constant_work`, which the operation counter does not count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .neurons import IFNeuron
from .qcfs import broadcast_channels
from .registry import SiteSpec, UnsupportedModuleError
from .sites import iter_site_specs, site_name, site_unit

_constant_depth = 0


@contextlib.contextmanager
def constant_work() -> Iterator[None]:
    """Mark the work inside as the computation of a model constant (an offset's bias map), not inference."""
    global _constant_depth
    _constant_depth += 1
    try:
        yield
    finally:
        _constant_depth -= 1


def computing_constants() -> bool:
    """Whether the current work computes a model constant (see :func:`constant_work`)."""
    return _constant_depth > 0


def _stamp(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's current values for the cache: the object, its in-place version, its storage."""
    return id(tensor), tensor._version, tensor.data_ptr()


def _without_bias(consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer layer's linear part (no bias) applied to ``x``, with its own padding."""
    if isinstance(consumer, nn.Conv2d):
        return consumer._conv_forward(x, consumer.weight, None)
    return F.linear(x, consumer.weight)


class ConsumerOffset:
    """The output offset of one spiking site, added by its consumer layer.

    A forward hook on the consumer adds the offset's bias map to the consumer's output; a forward hook on
    the neuron records the shape of what the neuron emits (the shape the constant map must have before the
    resampling, if any). The neuron is looked up at every call, so the hook follows the site's parameters.
    """

    def __init__(self, parent: nn.Module, spec: SiteSpec):
        self.parent = parent
        self.spec = spec
        self.site_shape: tuple[int, ...] | None = None
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def record(self, _neuron: nn.Module, _args, out: torch.Tensor) -> None:
        """Forward hook on the neuron: remember the shape of one sample of its output."""
        self.site_shape = tuple(out.shape[1:])

    def __call__(self, consumer: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        neuron = site_unit(self.parent, self.spec)
        if not isinstance(neuron, IFNeuron) or neuron.output_offset is None:
            return out
        return out + self.bias_map(consumer, neuron, args[0])

    def bias_map(self, consumer: nn.Module, neuron: IFNeuron, consumer_input: torch.Tensor) -> torch.Tensor:
        """``consumer_nobias(resample(offset * 1))`` for one sample, ``(1, out_channels, ...)``."""
        offset, weight = neuron.output_offset, consumer.weight
        shape = self.site_shape if self.spec.resample else tuple(consumer_input.shape[1:])
        if shape is None:
            raise RuntimeError(f"{self.spec.consumer} ran before its site's neuron; cannot place its offset.")
        trainable = torch.is_grad_enabled() and (offset.requires_grad or weight.requires_grad)
        key = (shape, weight.dtype, weight.device, _stamp(weight), _stamp(offset))
        if not trainable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with constant_work():
            ones = torch.ones((1, *shape), dtype=weight.dtype, device=weight.device)
            constant = ones * broadcast_channels(offset, ones)
            if self.spec.resample:
                constant = getattr(self.parent, self.spec.resample)(constant)
            value = _without_bias(consumer, constant)
        if not trainable:
            self._cache = (key, value.detach())
        return value


def install_consumer_offsets(unet: nn.Module) -> None:
    """Let the consumer of every spiking site with offsets add the site's output offset (a bias map)."""
    for parent_name, parent, spec in list(iter_site_specs(unet)):
        neuron = site_unit(parent, spec)
        if not isinstance(neuron, IFNeuron) or neuron.output_offset is None:
            continue
        consumer = getattr(parent, spec.consumer)
        if not isinstance(consumer, (nn.Conv2d, nn.Linear)):
            raise UnsupportedModuleError(
                f"Site `{site_name(parent_name, spec)}` feeds a {type(consumer).__name__}; output offsets need a "
                "Conv2d or Linear consumer to hold their constant. Quantize without offsets."
            )
        hook = ConsumerOffset(parent, spec)
        neuron.register_forward_hook(hook.record)
        consumer.register_forward_hook(hook)
