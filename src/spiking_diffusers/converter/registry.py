"""One registry of block handlers: everything the converter knows about a module type, in one entry.

The converter meets a diffusers UNet as a tree of modules. For each module *type* one
:class:`BlockHandler` says what it is (linear per sample, a block that only wires its children, an op
that is not linear in spikes, an activation, or the root model), which activation call sites it holds,
which of its weight layers read the residual stream (residual spikes), what it refuses, and how it
absorbs a neuron's 1 / lambda in the unit-threshold form. A module type without a handler is rejected
by name (see :mod:`~spiking_diffusers.converter.support`), never silently left analog.

The handlers of the diffusers blocks live in :mod:`~spiking_diffusers.converter.blocks`; supporting a new
block type is one :func:`register_block` call there (in the spirit of torchao's per-module handlers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModuleError(ValueError):
    """A module (or a functional call inside one) that the converter cannot turn into spikes."""


ROLES = ("model", "block", "linear", "nonlinear", "activation")
"""``model``: a root UNet; ``block``: a container whose own forward only wires registered children;
``linear``: linear in its input per sample, left as it is; ``nonlinear``: kept real-valued in the spiking
network and compensated over time (GroupNorm, attention); ``activation``: what a call site holds."""


@dataclass(frozen=True)
class SiteSpec:
    """One activation call site inside a parent module.

    ``activation`` is the attribute holding the activation module that is called, ``consumer`` the
    weight layer its output feeds (it absorbs the threshold in the unit-threshold form; ``None`` where the
    output feeds a product instead, as GEGLU's gate: then ``width`` gives the site's channel count, and the
    unit-threshold form and output offsets are refused), ``source`` a layer private to the site whose
    output is the site's only input (``None`` when the input is shared or mixed), and ``kind`` is
    ``"spatial"`` for feature maps ``(B, C, H, W)``, ``"temb"`` for the time embedding ``(B, C)`` or
    ``"tokens"`` for a transformer's token-major ``(B, N, C)`` activations (channels last).
    ``resample``, where set, names the parent's linear resampling (an attribute holding a callable) that the
    site's output passes before the consumer reads it (a ResNet block's up- or down-sampling); the output
    offsets need it to know what the consumer receives of a constant.
    """

    name: str
    activation: str
    consumer: str | None
    source: str | None
    kind: str
    resample: str | None = None
    width: int | None = None

    @property
    def ndim(self) -> int:
        """The rank of the site's input: 2 for the time embedding, 3 for tokens, 4 for feature maps."""
        return {"temb": 2, "tokens": 3}.get(self.kind, 4)

    @property
    def channels_last(self) -> bool:
        """Whether the site's channels are on the last dim (token-major inputs) rather than dim 1."""
        return self.kind == "tokens"


@dataclass(frozen=True)
class Site:
    """What a user's ``filter_fn(site)`` sees of a call site: its full name (e.g.
    ``down_blocks.0.resnets.1.act2``), its ``kind`` (``"spatial"`` or ``"temb"``) and the type name of the
    block that holds it (e.g. ``"ResnetBlock2D"``)."""

    name: str
    kind: str
    block: str


def _nothing(_module: nn.Module) -> list:
    return []


@dataclass(frozen=True)
class BlockHandler:
    """How the converter treats one module type (see :data:`ROLES`).

    ``sites(module)`` lists its activation call sites; ``encoded_inputs(module)`` the attributes holding
    convolutions that read the residual stream (they get a spike encoder with residual spikes);
    ``check(name, module)`` raises :class:`~.support.UnsupportedModuleError` for an instance the converter
    cannot handle; ``absorb_threshold(module, lam)`` divides the module's output channels by ``lam`` (the
    unit-threshold form folds 1 / lambda into a neuron's private source layer) and returns whether it could.
    ``replace(module)``, for a module whose forward calls its activation as a function (diffusers' GEGLU),
    returns an equivalent module with the same state-dict keys whose activation is a module call site; the
    converter swaps it in before it installs units.
    """

    role: str
    sites: Callable[[nn.Module], list[SiteSpec]] = _nothing
    encoded_inputs: Callable[[nn.Module], list[str]] = _nothing
    check: Callable[[str, nn.Module], None] | None = None
    absorb_threshold: Callable[[nn.Module, torch.Tensor], bool] | None = None
    replace: Callable[[nn.Module], nn.Module] | None = None


BLOCK_HANDLERS: dict[type, BlockHandler] = {}


def register_block(
    module_type: type,
    role: str,
    *,
    sites: Callable[[nn.Module], list[SiteSpec]] | None = None,
    encoded_inputs: Callable[[nn.Module], list[str]] | None = None,
    check: Callable[[str, nn.Module], None] | None = None,
    absorb_threshold: Callable[[nn.Module, torch.Tensor], bool] | None = None,
    replace: Callable[[nn.Module], nn.Module] | None = None,
) -> BlockHandler:
    """Register how the converter treats modules of exactly ``module_type`` (subclasses need their own)."""
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}; choose one of {ROLES}.")
    handler = BlockHandler(role, sites or _nothing, encoded_inputs or _nothing, check, absorb_threshold, replace)
    BLOCK_HANDLERS[module_type] = handler
    return handler


def handler_for(module: nn.Module) -> BlockHandler | None:
    """The handler registered for ``module``'s exact type, or ``None``."""
    return BLOCK_HANDLERS.get(type(module))


def has_role(module: nn.Module, *roles: str) -> bool:
    """Whether ``module``'s type is registered with one of ``roles``."""
    handler = handler_for(module)
    return handler is not None and handler.role in roles


def registered(role: str) -> list[type]:
    """Every module type registered with ``role``, in registration order."""
    return [module_type for module_type, handler in BLOCK_HANDLERS.items() if handler.role == role]
