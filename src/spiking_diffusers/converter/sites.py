"""Where the activation call sites of a diffusers `UNet2DModel` are, and how each one is wired.

Diffusers blocks call one activation module several times: `ResnetBlock2D.nonlinearity` runs after
`norm1`, on the time embedding and after `norm2`. Every *call* must become its own unit with its own
threshold, so a shared activation is replaced by a :class:`CallSiteRouter` that hands each call, in
order, to its own unit. The call sites of each module type come from its handler in the block registry
(:mod:`~spiking_diffusers.converter.blocks`); a module type that is not registered, and holds an
activation, is rejected by :mod:`spiking_diffusers.converter.support` rather than silently left analog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .registry import SiteSpec, handler_for


def iter_site_specs(model: nn.Module) -> Iterator[tuple[str, nn.Module, SiteSpec]]:
    """Yield ``(parent_name, parent, spec)`` for every registered call site in ``model``."""
    for name, module in model.named_modules():
        handler = handler_for(module)
        for spec in handler.sites(module) if handler else []:
            yield name, module, spec


def site_name(parent_name: str, spec: SiteSpec) -> str:
    """The user-facing name of a site, e.g. ``down_blocks.0.resnets.1.temb_act``."""
    return f"{parent_name}.{spec.name}" if parent_name else spec.name


class CallSiteRouter(nn.Module):
    """Stands in for an activation module that its parent calls several times.

    Each call goes to the next unit in call order; the parent's forward pre-hook rewinds the order, so
    every forward of the parent uses ``units[order[0]]`` first. The expected tensor rank of every call is
    checked, so a change in the parent's call pattern fails loudly instead of mixing thresholds up.
    """

    def __init__(self, units: dict[str, nn.Module], ndims: list[int]):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.order = list(units)
        self.ndims = list(ndims)
        self.position = 0

    def rewind(self, *_args) -> None:
        """Start the call order again (the parent's forward pre-hook)."""
        self.position = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position >= len(self.order):
            raise RuntimeError(
                f"Activation called more often than the {len(self.order)} known call sites {self.order}; "
                "this diffusers version calls it differently, please report it."
            )
        name, ndim = self.order[self.position], self.ndims[self.position]
        if x.dim() != ndim:
            raise RuntimeError(
                f"Call site {name!r} expected a {ndim}-d input, got {x.dim()}-d: the parent module calls its "
                "activation in an unexpected order."
            )
        self.position += 1
        return self.units[name](x)


def install_units(model: nn.Module, make_unit: Callable[[str, SiteSpec, nn.Module, int], nn.Module]) -> None:
    """Replace every registered activation call site of ``model`` by ``make_unit(name, spec, original, channels)``.

    Sites that share an activation attribute are grouped under a :class:`CallSiteRouter`.
    """
    grouped: dict[tuple[str, str], list[tuple[nn.Module, SiteSpec]]] = {}
    for parent_name, parent, spec in list(iter_site_specs(model)):
        grouped.setdefault((parent_name, spec.activation), []).append((parent, spec))
    for (parent_name, attr), entries in grouped.items():
        parent = entries[0][0]
        original = getattr(parent, attr)
        units = {}
        for _, spec in entries:
            channels = spec.width or getattr(parent, spec.consumer).weight.shape[1]
            units[spec.name] = make_unit(site_name(parent_name, spec), spec, original, channels)
        if len(entries) == 1:
            setattr(parent, attr, next(iter(units.values())))
        else:
            router = CallSiteRouter(units, [spec.ndim for _, spec in entries])
            setattr(parent, attr, router)
            parent.register_forward_pre_hook(router.rewind)


def site_unit(parent: nn.Module, spec: SiteSpec) -> nn.Module:
    """The unit installed at site ``spec`` of ``parent`` (behind the :class:`CallSiteRouter` of a shared activation)."""
    holder = getattr(parent, spec.activation)
    return holder.units[spec.name] if isinstance(holder, CallSiteRouter) else holder


def replace_site_unit(parent: nn.Module, spec: SiteSpec, unit: nn.Module) -> None:
    """Install ``unit`` at site ``spec`` of ``parent`` in place of the one there."""
    holder = getattr(parent, spec.activation)
    if isinstance(holder, CallSiteRouter):
        holder.units[spec.name] = unit
    else:
        setattr(parent, spec.activation, unit)


def site_units(model: nn.Module) -> dict[str, nn.Module]:
    """Map every site name to the unit currently installed there (QCFS unit or neuron)."""
    return {site_name(name, spec): site_unit(parent, spec) for name, parent, spec in iter_site_specs(model)}


def site_wiring(model: nn.Module) -> dict[str, tuple[nn.Module, SiteSpec]]:
    """Map every site name to ``(parent, spec)``, for code that needs the consumer or source layer."""
    return {site_name(parent_name, spec): (parent, spec) for parent_name, parent, spec in iter_site_specs(model)}
