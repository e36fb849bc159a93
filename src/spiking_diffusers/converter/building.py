"""Module surgery shared by quantization, conversion and loading: only activation call sites and the
non-linear ops are touched; the rest of the diffusers UNet, and its forward code, stays as it is."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from .blocks import OUTPUT_SITE
from .encoded_attention import is_encoded
from .neurons import IFNeuron
from .offsets import install_consumer_offsets
from .qcfs import QCFSActivation
from .registry import Site, handler_for, has_role
from .residual_spikes import install_encoder_neurons, install_input_encoders
from .sites import SiteSpec, install_units, iter_site_specs, replace_site_unit, site_name, site_unit
from .support import check_structure
from .temporal import TemporalOp
from .timestep_groups import copy_threshold, make_threshold_tables, table_groups

TIME_EMBEDDING_MODES = ("auto", "spiking", "analog")
UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}
"""The diffusers UNets the converter takes, by the name their configs and this package's models record."""


def unet_config_dict(unet: UNet2DModel) -> dict[str, Any]:
    """The UNet's config as a plain JSON-able dict, without diffusers' private bookkeeping keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}


def spatial_size(sample_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from a UNet config's ``sample_size``: one int for square samples, or a pair."""
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


def move_like(module: nn.Module, reference: nn.Module) -> None:
    """Move ``module`` to the device and dtype of ``reference`` (before weights are copied into it)."""
    param = next(reference.parameters())
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules these models do not have.
    nn.Module.to(module, device=param.device, dtype=param.dtype)


def swap_replaced_modules(module: nn.Module) -> None:
    """Swap, in place, every module whose handler has a ``replace`` (e.g. diffusers' GEGLU, which calls its
    GELU as a function) for its equivalent with a module call site; the state-dict keys stay the same."""
    for child_name, child in list(module.named_children()):
        handler = handler_for(child)
        if handler is not None and handler.replace is not None:
            setattr(module, child_name, handler.replace(child))
        else:
            swap_replaced_modules(child)


def build_qcfs_unet(
    unet_config: dict[str, Any],
    levels: int,
    phi: float,
    per_channel: bool,
    tsm_steps: int = 0,
    residual_spikes: bool = False,
    threshold_groups: int = 1,
    offsets: bool = False,
    unet_class: type[nn.Module] = UNet2DModel,
    output_precision: int = 1,
) -> nn.Module:
    """A freshly initialised ``unet_class`` (UNet2DModel or UNet2DConditionModel) of ``unet_config`` with a QCFS
    unit at every activation call site (with temporal factors for ``tsm_steps`` spiking steps when that is not
    0; with an input shift and an output offset with ``offsets``), and with ``residual_spikes`` a signed QCFS
    encoder in front of every residual-reading convolution and attention projection. With ``threshold_groups``
    K > 1 every unit holds a table of K thresholds (see :mod:`.timestep_groups`). The output activation (the unit
    in front of ``conv_out``) gets ``output_precision`` times ``levels``."""
    unet = unet_class.from_config(dict(unet_config))
    check_structure(unet)
    swap_replaced_modules(unet)
    if offsets:
        _refuse_consumerless_sites(unet, "offsets=True (the output offset is a bias map of the consumer layer)")

    def make_unit(name: str, spec: SiteSpec, original: nn.Module, channels: int) -> QCFSActivation:
        return QCFSActivation(
            original,
            channels,
            levels=levels * output_precision if name == OUTPUT_SITE else levels,
            phi=phi,
            per_channel=per_channel,
            tsm_steps=tsm_steps,
            offsets=offsets,
            channels_last=spec.channels_last,
        )

    install_units(unet, make_unit)
    if residual_spikes:
        install_input_encoders(unet, levels, phi, per_channel)
    if threshold_groups > 1:
        make_threshold_tables(unet, threshold_groups)
    return unet


def _refuse_consumerless_sites(unet: nn.Module, option: str) -> None:
    """``option`` needs every site to feed a weight layer; name the first that feeds a product instead."""
    for parent_name, _, spec in iter_site_specs(unet):
        if spec.consumer is None:
            raise ValueError(
                f"{option} needs every activation site to feed a weight layer, but `{site_name(parent_name, spec)}` "
                "feeds a product or a layer outside its block (a transformer feed-forward); leave the option out."
            )


def resolve_time_embedding(unet: nn.Module, time_embedding: str) -> str:
    """``"auto"`` keeps the time embedding analog only where the UNet multiplies it with feature maps.

    With ``resnet_time_scale_shift="scale_shift"`` the embedding scales the normalised features; two
    time-varying signals multiplied do not average to the product of their means, so there the
    embedding's sites stay QCFS units (constant over time, counted as real-valued work).
    """
    if time_embedding not in TIME_EMBEDDING_MODES:
        raise ValueError(f"Unknown time_embedding {time_embedding!r}; choose one of {TIME_EMBEDDING_MODES}.")
    if time_embedding != "auto":
        return time_embedding
    scale_shift = any(getattr(m, "time_embedding_norm", None) == "scale_shift" for m in unet.modules())
    return "analog" if scale_shift else "spiking"


def site_infos(unet: nn.Module) -> list[Site]:
    """Every activation call site of ``unet`` as a :class:`~.registry.Site`, in module order."""
    return [
        Site(site_name(parent_name, spec), spec.kind, type(parent).__name__)
        for parent_name, parent, spec in iter_site_specs(unet)
    ]


def analog_site_names(unet: nn.Module, filter_fn: Callable[[Site], bool] | None) -> list[str]:
    """The sites for which ``filter_fn(site)`` is false (they stay analog QCFS units), in module order."""
    if filter_fn is None:
        return []
    return [site.name for site in site_infos(unet) if not filter_fn(site)]


def spike_sites(unet: nn.Module, time_embedding: str, analog_sites: Sequence[str] = ()) -> set[str]:
    """Names of the sites that become IF neurons: all of them except ``analog_sites``, and except the time
    embedding's where it stays analog (see :func:`resolve_time_embedding`)."""
    names = [site.name for site in site_infos(unet)]
    unknown = sorted(set(analog_sites) - set(names))
    if unknown:
        raise ValueError(
            f"analog_sites names {unknown}, which are not call sites of this UNet; sites are e.g. {names[:3]}."
        )
    analog_temb = resolve_time_embedding(unet, time_embedding) == "analog"
    return {
        site.name
        for site in site_infos(unet)
        if site.name not in analog_sites and not (analog_temb and site.kind == "temb")
    }


def install_neurons(
    unet: nn.Module,
    neuron: str,
    nonlinear_mode: str,
    time_embedding: str,
    analog_sites: Sequence[str] = (),
    burst: int = 1,
    output_precision: int = 1,
) -> None:
    """Turn a QCFS UNet into its spiking form, in place: QCFS units become IF neurons (thresholds copied),
    except ``analog_sites``, signed input encoders ternary IF neurons, and every GroupNorm and attention
    module outside attention (the GroupNorm and core of a split attention) becomes a :class:`TemporalOp`.
    A unit's input shift and output offset go to its neuron; the offset is added by the consumer layer. The
    output activation's neuron sends up to ``output_precision`` times ``burst`` spikes per step (its QCFS unit
    has that many times the levels)."""
    spiking = spike_sites(unet, time_embedding, analog_sites)
    for parent_name, parent, spec in list(iter_site_specs(unet)):
        name = site_name(parent_name, spec)
        if name not in spiking:
            continue
        unit = site_unit(parent, spec)
        factors = unit.temporal_factors
        tsm_steps = 0 if factors is None else factors.numel()
        offsets = unit.input_shift is not None
        neuron_module = IFNeuron(
            unit.channels,
            unit.per_channel,
            unit.phi,
            neuron,
            tsm_steps=tsm_steps,
            burst=burst * output_precision if name == OUTPUT_SITE else burst,
            groups=table_groups(unit),
            offsets=offsets,
            channels_last=unit.channels_last,
        )
        neuron_module.to(unit.threshold)  # the unit's dtype: a float64 model's values must not pass through float32
        copy_threshold(neuron_module, unit)
        if offsets:
            neuron_module.input_shift.data.copy_(unit.input_shift.data)
            neuron_module.output_offset.data.copy_(unit.output_offset.data)
        if factors is not None:
            neuron_module.temporal_factors.data.copy_(factors.data)
        replace_site_unit(parent, spec, neuron_module)
    install_encoder_neurons(unet, burst)
    install_consumer_offsets(unet)
    _wrap_nonlinear_ops(unet, nonlinear_mode)


def _wrap_nonlinear_ops(module: nn.Module, nonlinear_mode: str) -> None:
    for child_name, child in list(module.named_children()):
        if has_role(child, "nonlinear") and not is_encoded(child):
            # An attention module is one op as a whole: its inner GroupNorm is not wrapped again. One split
            # at its projections (residual spikes) has its GroupNorm and its core wrapped instead.
            setattr(module, child_name, TemporalOp(child, nonlinear_mode))
        elif not isinstance(child, (TemporalOp, QCFSActivation, IFNeuron)):
            _wrap_nonlinear_ops(child, nonlinear_mode)
