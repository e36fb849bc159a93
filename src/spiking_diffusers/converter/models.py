"""The QCFS network and the spiking network as diffusers models (``ModelMixin`` + ``ConfigMixin``).

Both hold an ordinary ``UNet2DModel`` whose activation call sites were replaced, and call its forward
unchanged, so they fit every diffusers pipeline that takes a UNet. Their config carries everything
needed to rebuild them; the weights, thresholds included, go to safetensors.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput

from ..validation import check_bool, check_choice, check_float, check_int, renamed
from .building import (
    analog_site_names,
    build_qcfs_unet,
    install_neurons,
    move_like,
    resolve_time_embedding,
    unet_config_dict,
)
from .neurons import NEURON_TYPES, IFNeuron
from .output_filter import DEFAULT_FILTER_GROUPS, OutputFilter, check_output_filter
from .probes import noised_probe_batches, to_device
from .qcfs import QuantizerUnit, set_tsm_steps
from .registry import Site
from .residual_spikes import input_encoders
from .sites import site_units
from .support import check_functional_activations, check_structure
from .temporal import EXECUTION_MODES, NONLINEAR_MODES, TemporalModule, TemporalOp
from .thresholds import collect_group_site_inputs, collect_site_inputs, init_thresholds
from .timestep_groups import check_threshold_groups, grouped_sites, schedule_length, selected_groups, timestep_groups
from .unit_threshold import fold_unit_thresholds

THRESHOLD_FORMS = ("lambda", "unit")


class _SiteModelMixin:
    """What both models share: their sites (activation units or neurons, and input encoders) and thresholds."""

    unet: torch.nn.Module
    unet_class: type[torch.nn.Module] = UNet2DModel
    """The diffusers UNet the model wraps (its forward runs unchanged inside)."""
    output_filter: OutputFilter | None
    """The fitted per-timestep filter on the noise prediction (see :mod:`.output_filter`), if the model has one."""
    _filter_on: bool = True

    def _make_output_filter(self, kernel_size: int, groups: int) -> None:
        """Give the model an identity output filter of ``kernel_size`` over ``groups`` ranges (0: none)."""
        kernel_size, groups = check_output_filter(kernel_size, groups)
        config = self.config
        self.output_filter = (
            OutputFilter(
                config.in_channels, config.out_channels, kernel_size, groups, schedule_length(config.unet_config)
            )
            if kernel_size
            else None
        )

    def set_output_filter(self, kernel_size: int, groups: int = DEFAULT_FILTER_GROUPS) -> OutputFilter | None:
        """Add (or replace, or with 0 remove) the output filter, starting as the identity; recorded in the
        config. Calibration fits it (:func:`~spiking_diffusers.calibration.output_filter.fit_output_filter`)."""
        self._make_output_filter(kernel_size, groups)
        if self.output_filter is not None:
            move_like(self.output_filter, self)
        self.register_to_config(output_filter_size=int(kernel_size), output_filter_groups=int(groups))
        return self.output_filter

    @contextlib.contextmanager
    def output_filter_disabled(self) -> Iterator[None]:
        """Return the unfiltered noise prediction inside this context (what the filter is fitted on)."""
        self._filter_on = False
        try:
            yield
        finally:
            self._filter_on = True

    def _filtered(self, prediction: torch.Tensor, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        if self.output_filter is None or not self._filter_on:
            return prediction
        return self.output_filter(prediction, sample, timestep)

    def sites(self) -> dict[str, torch.nn.Module]:
        """Every activation call site by name, mapped to its unit (QCFS unit or IF neuron), then every
        residual input encoder (``<layer>.encoder``: signed QCFS unit or ternary IF neuron), if any."""
        return site_units(self.unet) | input_encoders(self.unet)

    def thresholds(self) -> dict[str, torch.Tensor]:
        """Each site's threshold lambda (a copy), for reports and plots: ``(C,)`` (``(1,)`` per site), or the
        ``(K, C)`` table of a model with K timestep-aware threshold groups."""
        return {name: unit.threshold.detach().clone() for name, unit in self.sites().items()}

    def _timestep_groups(
        self, sample: torch.Tensor, timestep: Any, repeat: int = 1
    ) -> contextlib.AbstractContextManager:
        """With K > 1 threshold groups: every site's ``group_index`` set from ``timestep`` for the block (repeated
        ``repeat`` times, for a time-folded batch); nothing to do for K = 1."""
        groups = int(self.config.threshold_groups)
        if groups == 1:
            return contextlib.nullcontext()
        length = schedule_length(self.config.unet_config)
        index = timestep_groups(timestep, sample.shape[0], groups, length, sample.device)
        return selected_groups(grouped_sites(self.unet), index.repeat(repeat) if repeat > 1 else index)

    def _check_inputs(self, sample: Any, timestep: Any, class_labels: Any) -> None:
        """Refuse inputs the UNet cannot take with a message about them (torch's would be about T x B)."""
        name = type(self).__name__
        if not torch.is_tensor(sample):
            raise TypeError(f"{name}: sample must be a torch.Tensor, got {type(sample).__name__}.")
        channels = self.config.in_channels
        if sample.dim() != 4 or sample.shape[1] != channels:
            raise ValueError(
                f"{name}: sample must have shape (batch, {channels}, height, width) (in_channels = {channels}), "
                f"got {tuple(sample.shape)}."
            )
        if sample.dtype != self.dtype:
            raise TypeError(
                f"{name}: sample is {sample.dtype} but the model's weights are {self.dtype}; pass "
                "sample.to(model.dtype) (or convert the model with model.to(dtype))."
            )
        batch = sample.shape[0]
        if torch.is_tensor(timestep) and timestep.numel() not in (1, batch):
            raise ValueError(
                f"{name}: timestep must be one value or one per sample ({batch}), got shape {tuple(timestep.shape)}."
            )
        if torch.is_tensor(class_labels) and (class_labels.dim() == 0 or class_labels.shape[0] != batch):
            raise ValueError(
                f"{name}: class_labels must have one entry per sample ({batch}), got shape {tuple(class_labels.shape)}."
            )
        num_classes = self.config.unet_config.get("num_class_embeds")
        labels = torch.is_tensor(class_labels) and num_classes and not class_labels.is_floating_point()
        if labels and class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= num_classes):
            raise ValueError(
                f"{name}: class_labels must lie in 0..{num_classes - 1} (num_class_embeds = {num_classes}), "
                f"got {class_labels.min().item()}..{class_labels.max().item()}."
            )
        if class_labels is None and (num_classes or self.config.unet_config.get("class_embed_type")):
            raise ValueError(f"{name}: this UNet is class-conditional; pass class_labels (one per sample).")

    def _check_encoder_hidden_states(self, sample: torch.Tensor, encoder_hidden_states: Any) -> None:
        """A conditional UNet's text (or label) embedding: ``(batch, tokens, cross_attention_dim)``."""
        name, width = type(self).__name__, self.config.unet_config.get("cross_attention_dim")
        if not torch.is_tensor(encoder_hidden_states):
            raise TypeError(
                f"{name}: encoder_hidden_states must be a tensor of shape (batch, tokens, {width}), got "
                f"{type(encoder_hidden_states).__name__}; a conditional UNet cannot run without its conditioning."
            )
        shape = tuple(encoder_hidden_states.shape)
        if len(shape) != 3 or shape[0] != sample.shape[0] or (isinstance(width, int) and shape[2] != width):
            raise ValueError(
                f"{name}: encoder_hidden_states must have shape ({sample.shape[0]}, tokens, {width}) (batch of the "
                f"sample, cross_attention_dim = {width}), got {shape}."
            )


class QCFSUNet2DModel(_SiteModelMixin, ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` whose every activation call site is a QCFS unit with its own threshold.

    ``forward`` has the signature of ``UNet2DModel.forward``. :meth:`as_ann` runs the original
    activations instead, giving the unquantized network from the same weights. With ``residual_spikes``
    every convolution that reads the residual stream, and every attention projection, quantizes its input
    with a signed QCFS unit, so that the spiking network feeds it spikes (see
    :mod:`~spiking_diffusers.converter.residual_spikes`). With ``offsets`` every activation unit also learns
    an input shift and an output offset, ``qcfs(z - shift) + offset`` (see
    :mod:`~spiking_diffusers.converter.offsets`). ``burst`` records the spikes per step of the neurons its
    calibration fine-tuned for (``levels = burst * T``); :meth:`SpikingUNet2DModel.from_qcfs` converts with it.
    ``output_precision`` = P gives the output activation (the unit in front of ``conv_out``) P x ``levels``, and
    its neurons P x ``burst`` spikes per step: the first denoising steps need its precision, and its spikes
    feed only the output convolution (see :data:`~.blocks.OUTPUT_SITE`). Saved models without it load with 1.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        levels: int = 8,
        phi: float = 0.5,
        per_channel: bool = False,
        sample_size: int | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        tsm_steps: int = 0,
        residual_spikes: bool = False,
        threshold_groups: int = 1,
        offsets: bool = False,
        burst: int = 1,
        output_precision: int = 1,
        output_filter_size: int = 0,
        output_filter_groups: int = DEFAULT_FILTER_GROUPS,
    ):
        super().__init__()
        _check_settings(unet_config, levels, phi)
        check_threshold_groups(threshold_groups, unet_config)
        check_int(burst, "burst", low=1)
        check_int(output_precision, "output_precision", low=1)
        _check_offsets_with_groups(offsets, threshold_groups)
        self.unet = build_qcfs_unet(
            unet_config,
            levels,
            phi,
            per_channel,
            tsm_steps,
            residual_spikes,
            threshold_groups=int(threshold_groups),
            offsets=offsets,
            unet_class=self.unet_class,
            output_precision=int(output_precision),
        )
        self._make_output_filter(output_filter_size, output_filter_groups)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DModel,
        levels: int = 8,
        phi: float = 0.5,
        per_channel: bool = False,
        init: str | None = "percentile",
        percentile: float = 99.9,
        num_samples: int = 16,
        seed: int = 0,
        residual_spikes: bool = False,
        threshold_groups: int = 1,
        offsets: bool = False,
        output_precision: int = 1,
    ) -> QCFSUNet2DModel:
        """Replace every activation call site of ``unet`` by its own QCFS unit (``levels`` = L).

        The original ``unet`` is not modified. Thresholds start from ``init`` ("percentile" of each site's
        input, or "mse": the quantization-error minimiser) measured on ``num_samples`` noised inputs; pass
        ``init=None`` to leave them at 1 (e.g. before a full calibration). ``residual_spikes=True`` also puts
        a signed QCFS encoder (its own threshold, initialised the same way) in front of every convolution
        that reads the residual stream and of the attention projections, so that the spiking network feeds
        those layers spikes too. ``threshold_groups`` K > 1 gives every site a table of K thresholds, one per
        equal range of the diffusion schedule (timestep-aware thresholds), each initialised from the probes in
        its range (the probes of all ranges where it has none). Raises
        those layers spikes too. ``offsets=True`` gives every activation unit an input shift and an output
        offset, ``qcfs(z - shift) + offset``, initialised with the thresholds (offset = shift, fitted with
        lambda; see :func:`~.thresholds.init_thresholds`; 0 with ``init=None``). ``output_precision`` = P gives
        the output activation P x ``levels`` (see the class). Raises
        :class:`~.registry.UnsupportedModuleError` naming any module that cannot be converted.
        """
        if isinstance(unet, QCFSUNet2DModel | SpikingUNet2DModel):
            raise TypeError(
                f"quantize() takes the original UNet2DModel; this model is already a {type(unet).__name__}."
            )
        if not isinstance(unet, torch.nn.Module):  # other modules: check_structure names what is not supported
            raise TypeError(
                f"quantize() takes a diffusers UNet2DModel or UNet2DConditionModel, got {type(unet).__name__}."
            )
        levels = check_int(levels, "levels", "levels")
        check_float(phi, "phi", 0, 1)
        check_bool(per_channel, "per_channel")
        check_choice(init, "init", (None, "percentile", "mse"))
        check_float(percentile, "percentile", 0, 100, low_open=True)
        check_int(num_samples, "num_samples", "num_samples")
        check_int(seed, "seed", "seed")
        check_bool(residual_spikes, "residual_spikes")
        check_bool(offsets, "offsets")
        check_int(output_precision, "output_precision", low=1)
        check_structure(unet)
        target = _QCFS_CLASSES[type(unet)]
        if not issubclass(target, cls):
            raise TypeError(f"{cls.__name__}.from_unet takes a {cls.unet_class.__name__}, got {type(unet).__name__}.")
        config = unet_config_dict(unet)
        threshold_groups = check_threshold_groups(threshold_groups, config)
        qnet = target(
            **conditioning_config(target, config),
            unet_config=config,
            levels=int(levels),
            phi=phi,
            per_channel=per_channel,
            sample_size=config.get("sample_size"),
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            residual_spikes=residual_spikes,
            threshold_groups=threshold_groups,
            offsets=offsets,
            output_precision=int(output_precision),
        )
        move_like(qnet, unet)
        missing, unexpected = qnet.unet.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(not key.endswith((".threshold", ".input_shift", ".output_offset")) for key in missing):
            raise RuntimeError(
                f"Weights did not map onto the QCFS network: missing {missing}, unexpected {unexpected}."
            )
        qnet.eval()

        param = next(unet.parameters())
        sample, timestep, kwargs = to_device(
            noised_probe_batches(config, num_samples=1, seed=seed), param.device, param.dtype
        )[0]
        with qnet.as_ann():
            check_functional_activations(qnet.unet, sample, timestep, **kwargs)
        if init is not None:
            probes = to_device(
                noised_probe_batches(config, num_samples=num_samples, seed=seed), param.device, param.dtype
            )
            by_group = collect_group_site_inputs(qnet, probes, seed=seed) if threshold_groups > 1 else None
            inputs = collect_site_inputs(qnet, probes, seed=seed)
            init_thresholds(qnet, inputs, method=init, percentile=percentile, group_inputs=by_group)
        return qnet

    def enable_tsm(self, steps: int) -> None:
        """Carry temporal factors (TSM) for a spiking network of ``steps`` time steps (0: drop them)."""
        set_tsm_steps(self.unet, steps)
        self.register_to_config(tsm_steps=int(steps))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        self._check_inputs(sample, timestep, class_labels)
        with self._timestep_groups(sample, timestep):
            out = self.unet(sample, timestep, class_labels=class_labels).sample
        out = self._filtered(out, sample, timestep)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    @contextlib.contextmanager
    def as_ann(self) -> Iterator[QCFSUNet2DModel]:
        """Run the original activations (SiLU, ...; the identity for input encoders) instead of the QCFS
        units inside this context, and no output filter (it was fitted to the QCFS units' error)."""
        units = [unit for unit in self.unet.modules() if isinstance(unit, QuantizerUnit)]
        for unit in units:
            unit.mode = "ann"
        try:
            with self.output_filter_disabled():
                yield self
        finally:
            for unit in units:
                unit.mode = "qcfs"


@dataclass
class SpikingUNet2DOutput(UNet2DOutput):
    """``UNet2DOutput`` of the spiking model: ``sample`` is its output layer averaged over time steps."""


class SpikingUNet2DModel(_SiteModelMixin, ModelMixin, ConfigMixin):
    """An integrate-and-fire spiking network converted from a :class:`QCFSUNet2DModel`.

    One ``forward`` simulates ``timesteps`` (T) time steps and returns the mean of the output layer over
    them. ``execution="batched"`` folds time into the batch (each weight layer runs once on ``T * B``
    samples); ``"stepwise"`` runs T passes of batch B with neuron state kept in between, so its memory
    does not grow with T. Both give the same result to float tolerance. With ``tsm=True`` every IF neuron
    scales its input current at step t by a learnable factor p_t (SDM's temporal-wise spiking mechanism);
    all factors 1 give exactly the network without it. With ``residual_spikes`` the convolutions that read
    the residual stream and the attention projections are fed by ternary IF encoders (spikes +-lambda).
    With ``offsets`` (from the QCFS network) each neuron subtracts its input shift from its input current and
    the layer it feeds adds the output offset's constant bias map, still reading spikes. ``delta_spikes``
    marks a network meant to run with delta spikes across denoising steps: each weight layer receives the
    change of its input spikes from the previous UNet evaluation and keeps its T input currents, which gives
    the same outputs; the energy count (``spiking_diffusers.energy``) follows it.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        levels: int = 8,
        phi: float = 0.5,
        per_channel: bool = False,
        timesteps: int = 8,
        neuron: str = "if",
        nonlinear_mode: str = "compensated",
        execution: str = "batched",
        threshold_form: str = "lambda",
        time_embedding: str = "auto",
        sample_size: int | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        tsm: bool = False,
        residual_spikes: bool = False,
        analog_sites: list[str] | None = None,
        burst: int = 1,
        threshold_groups: int = 1,
        offsets: bool = False,
        nonlinear_steps: int | None = None,
        delta_spikes: bool = False,
        output_precision: int = 1,
        output_filter_size: int = 0,
        output_filter_groups: int = DEFAULT_FILTER_GROUPS,
    ):
        super().__init__()
        _check_choice("neuron", neuron, NEURON_TYPES)
        check_int(output_precision, "output_precision", low=1)
        if output_precision > 1 and neuron != "if":
            raise ValueError(
                f"output_precision={output_precision} makes the output activation's neurons burst neurons, which "
                f"need neuron='if' (got {neuron!r}); convert with neuron='if', or use a QCFS model with "
                "output_precision=1."
            )
        _check_flag("delta_spikes", delta_spikes)
        _check_nonlinear_steps(nonlinear_steps, nonlinear_mode)
        _check_choice("nonlinear_mode", nonlinear_mode, NONLINEAR_MODES)
        _check_choice("execution", execution, EXECUTION_MODES)
        _check_choice("threshold_form", threshold_form, THRESHOLD_FORMS)
        _check_settings(unet_config, levels, phi)
        check_int(timesteps, "timesteps", "timesteps")
        threshold_groups = check_threshold_groups(threshold_groups, unet_config)
        if threshold_form == "unit" and threshold_groups > 1:
            raise ValueError(
                f"threshold_form='unit' needs one threshold per site, but this model has threshold_groups="
                f"{threshold_groups} (timestep-aware thresholds): a lambda that changes with the timestep cannot be "
                "folded into static weights. Use threshold_form='lambda'."
            )
        self.unet = build_qcfs_unet(
            unet_config,
            levels,
            phi,
            per_channel,
            tsm_steps=int(timesteps) if tsm else 0,
            residual_spikes=residual_spikes,
            threshold_groups=threshold_groups,
            offsets=offsets,
            unet_class=self.unet_class,
            output_precision=int(output_precision),
        )
        install_neurons(
            self.unet, neuron, nonlinear_mode, time_embedding, analog_sites or (), burst, int(output_precision)
        )
        self.temporal_modules = [m for m in self.unet.modules() if isinstance(m, TemporalModule)]
        for module in self.temporal_modules:
            if isinstance(module, TemporalOp):
                module.evaluations = nonlinear_steps
        self._make_output_filter(output_filter_size, output_filter_groups)

    @classmethod
    def from_qcfs(
        cls,
        qnet: QCFSUNet2DModel,
        spike_steps: int | None = None,
        neuron: str = "if",
        nonlinear_mode: str = "compensated",
        execution: str = "batched",
        threshold_form: str = "lambda",
        time_embedding: str = "auto",
        tsm: bool | None = None,
        filter_fn: Callable[[Site], bool] | None = None,
        burst: int | None = None,
        threshold_groups: int | None = None,
        timesteps: int | None = None,
        nonlinear_steps: int | None = None,
        delta_spikes: bool = True,
    ) -> SpikingUNet2DModel:
        """Turn every QCFS unit of ``qnet`` into an IF neuron (threshold = lambda, initial membrane = phi * lambda).

        ``spike_steps`` is T, the number of simulation steps per forward (default 8; ``timesteps`` is its deprecated
        name: the word also means the diffusion timestep); ``neuron`` is "if" or "signed_if"; GroupNorm and attention
        become ``nonlinear_mode`` ops ("compensated" or "per_step"); ``threshold_form="unit"`` rescales the weights so
        that every threshold is 1. ``tsm`` gives every neuron temporal factors (SDM's TSM): those ``qnet`` was
        calibrated with, else factors of 1; by default TSM is on exactly when ``qnet`` carries factors.
        ``filter_fn(site)`` chooses which call sites spike (a :class:`~.registry.Site`; false keeps the site an analog
        QCFS unit, counted as real-valued work; the choice is saved with the model). ``burst`` = B > 1 makes every IF
        neuron a multi-threshold neuron emitting up to B spikes per step (B * T levels in T steps: match it with a QCFS
        network of ``levels = B * T``; default: the B ``qnet`` was calibrated for, else 1). ``qnet`` is unchanged.
        Residual spikes follow ``qnet``: its signed input encoders (if it was quantized with ``residual_spikes=True``)
        become ternary IF neurons with their calibrated thresholds, and its output precision: the output activation's
        neurons send up to P x B spikes per step. So do timestep-aware thresholds: the neurons take
        ``qnet``'s tables of K thresholds (``threshold_groups``, if given, must be ``qnet``'s K; the unit form needs K =
        1). ``nonlinear_steps`` = E >= 2 computes the compensated real-valued ops (GroupNorm, LayerNorm, attention,
        gate products) at E of the T steps only, holding their value in between (still exact in the mean; see
        :class:`~.temporal.TemporalOp`); ``None``: at every step. ``delta_spikes`` (default on) records that the
        links from neurons to weight layers send the change of each time step's spikes from the previous UNet
        evaluation (the layers keep their T input currents): the same outputs, fewer accumulates in the energy
        count; ``False`` counts every spike as fired.
        """
        timesteps = renamed(spike_steps, timesteps, "spike_steps", "timesteps")
        timesteps = 8 if timesteps is None else timesteps
        _check_conversion_arguments(qnet, timesteps, tsm)
        target = _SPIKING_CLASSES[type(qnet)]
        if not issubclass(target, cls):
            raise TypeError(
                f"{cls.__name__}.from_qcfs takes a {cls.unet_class.__name__}'s QCFS model, got {type(qnet).__name__}."
            )
        config = dict(qnet.config)
        burst = int(config.get("burst") or 1) if burst is None else check_int(burst, "burst", low=1)
        groups = int(config.get("threshold_groups") or 1)
        precision = int(config.get("output_precision") or 1)
        if threshold_groups is not None and check_int(threshold_groups, "threshold_groups") != groups:
            raise ValueError(
                f"threshold_groups={threshold_groups} does not match the QCFS model, which has threshold_groups="
                f"{groups} (K threshold groups are set when quantizing or calibrating); leave it out, or pass "
                f"threshold_groups={groups}."
            )
        analog = analog_site_names(qnet.unet, filter_fn) or None
        calibrated_steps = int(config.get("tsm_steps") or 0)
        tsm = bool(calibrated_steps) if tsm is None else bool(tsm)
        if tsm and calibrated_steps and calibrated_steps != int(timesteps):
            raise ValueError(
                f"This QCFS model's temporal factors (TSM) were calibrated for T = {calibrated_steps}; convert it at "
                f"timesteps={calibrated_steps}, or pass tsm=False to drop them."
            )
        snn = target(
            **conditioning_config(target, config["unet_config"]),
            unet_config=config["unet_config"],
            levels=config["levels"],
            phi=config["phi"],
            per_channel=config["per_channel"],
            timesteps=int(timesteps),
            neuron=neuron,
            nonlinear_mode=nonlinear_mode,
            execution=execution,
            threshold_form=threshold_form,
            time_embedding=time_embedding,
            sample_size=config["sample_size"],
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            tsm=tsm,
            residual_spikes=config.get("residual_spikes", False),
            analog_sites=analog,
            burst=burst,
            threshold_groups=groups,
            offsets=config.get("offsets", False),
            nonlinear_steps=nonlinear_steps,
            delta_spikes=delta_spikes,
            output_precision=precision,
            output_filter_size=int(config.get("output_filter_size") or 0),
            output_filter_groups=int(config.get("output_filter_groups") or DEFAULT_FILTER_GROUPS),
        )
        move_like(snn, qnet)
        if qnet.output_filter is not None:
            snn.output_filter.load_state_dict(qnet.output_filter.state_dict())
        converted = copy.deepcopy(qnet.unet)
        set_tsm_steps(converted, int(timesteps) if tsm else 0)
        install_neurons(converted, neuron, nonlinear_mode, time_embedding, analog or (), burst, precision)
        snn.unet.load_state_dict(converted.state_dict())
        if threshold_form == "unit":
            fold_unit_thresholds(snn.unet)
        return snn.eval()

    @property
    def analog_time_embedding(self) -> bool:
        """Whether the time-embedding sites stay QCFS units (see ``resolve_time_embedding``)."""
        return resolve_time_embedding(self.unet, self.config.time_embedding) == "analog"

    def neurons(self) -> dict[str, IFNeuron]:
        """The sites that are spiking neurons, by name."""
        return {name: unit for name, unit in self.sites().items() if isinstance(unit, IFNeuron)}

    def to_qcfs(self) -> QCFSUNet2DModel:
        """The QCFS network with this model's weights, thresholds (and TSM factors): the network it was
        converted from, or calibrated as. Only the lambda threshold form maps back."""
        config = self.config
        target = next(qcfs for qcfs, spiking in _SPIKING_CLASSES.items() if spiking is type(self))
        qnet = target(
            **conditioning_config(target, config.unet_config),
            unet_config=config.unet_config,
            levels=config.levels,
            phi=config.phi,
            per_channel=config.per_channel,
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            residual_spikes=config.residual_spikes,
            tsm_steps=config.timesteps if config.tsm else 0,
            threshold_groups=config.threshold_groups,
            offsets=config.offsets,
            burst=int(config.get("burst") or 1),
            output_precision=int(config.get("output_precision") or 1),
            output_filter_size=int(config.get("output_filter_size") or 0),
            output_filter_groups=int(config.get("output_filter_groups") or DEFAULT_FILTER_GROUPS),
        )
        move_like(qnet, self)
        qnet.unet.load_state_dict(self.qcfs_state_dict())
        if self.output_filter is not None:
            qnet.output_filter.load_state_dict(self.output_filter.state_dict())
        return qnet.eval()

    def qcfs_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the names of the QCFS network's (lambda threshold form only)."""
        if self.config.threshold_form != "lambda":
            raise ValueError("Only lambda-form spiking models map back onto a QCFS network.")
        wrapped = [name for name, module in self.unet.named_modules() if isinstance(module, TemporalOp)]
        state = {}
        for key, value in self.unet.state_dict().items():
            if key.endswith("input_gain"):
                continue
            for prefix in wrapped:
                if key.startswith(prefix + ".op."):
                    key = prefix + "." + key[len(prefix) + 4 :]
                    break
            state[key] = value
        return state

    def set_delta_spikes(self, delta_spikes: bool) -> None:
        """Record whether the links to weight layers send delta spikes (recorded in the config; the outputs
        do not change, the energy count does)."""
        _check_flag("delta_spikes", delta_spikes)
        self.register_to_config(delta_spikes=delta_spikes)

    def set_execution(self, execution: str) -> None:
        """Switch between ``"batched"`` and ``"stepwise"`` simulation (recorded in the config)."""
        _check_choice("execution", execution, EXECUTION_MODES)
        self.register_to_config(execution=execution)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        spike_steps: int | None = None,
        snn_timesteps: int | None = None,
    ) -> SpikingUNet2DOutput | tuple:
        """Simulate ``spike_steps`` (T; default: the configured T) spiking steps on ``sample``.
        ``snn_timesteps`` is its deprecated name."""
        snn_timesteps = renamed(spike_steps, snn_timesteps, "spike_steps", "snn_timesteps")
        self._check_inputs(sample, timestep, class_labels)
        out = self._simulate(sample, timestep, {"class_labels": class_labels}, snn_timesteps)
        if not return_dict:
            return (out,)
        return SpikingUNet2DOutput(sample=out)

    def _simulate(
        self, sample: torch.Tensor, timestep: Any, conditioning: dict, spike_steps: int | None
    ) -> torch.Tensor:
        """Run the inner UNet over T time steps (``conditioning``: its keyword arguments, constant over time)
        and return the mean of its output."""
        num_steps = int(self.config.timesteps)
        if spike_steps is not None:
            num_steps = check_int(spike_steps, "spike_steps", "timesteps")
        execution = self.config.execution
        for module in self.temporal_modules:
            module.begin(num_steps, execution)
        try:
            with self._timestep_groups(sample, timestep, num_steps if execution == "batched" else 1):
                if execution == "batched":
                    out = self._forward_batched(sample, timestep, conditioning, num_steps)
                else:
                    out = self._forward_stepwise(sample, timestep, conditioning, num_steps)
        finally:
            for module in self.temporal_modules:
                module.reset_state()
        return self._filtered(out, sample, timestep)

    def _forward_batched(self, sample, timestep, conditioning: dict, num_steps: int) -> torch.Tensor:
        batch = sample.shape[0]
        folded = sample.repeat(num_steps, *([1] * (sample.dim() - 1)))
        repeated = {key: _repeat_batched(value, num_steps, batch) for key, value in conditioning.items()}
        out = self.unet(folded, _repeat_batched(timestep, num_steps, batch), **repeated).sample
        return out.unflatten(0, (num_steps, batch)).mean(0)

    def _forward_stepwise(self, sample, timestep, conditioning: dict, num_steps: int) -> torch.Tensor:
        total = None
        for _ in range(num_steps):
            out = self.unet(sample, timestep, **conditioning).sample
            total = out if total is None else total + out
        return total / num_steps


class QCFSUNet2DConditionModel(QCFSUNet2DModel):
    """:class:`QCFSUNet2DModel` for a ``UNet2DConditionModel`` (Stable Diffusion style: cross-attention on
    ``encoder_hidden_states``, optional class labels). Transformer blocks add LayerNorm (compensated like
    GroupNorm in the spiking network), self- and cross-attention, and GEGLU / GELU feed-forwards whose GELU
    is a call site. ``forward`` has ``UNet2DConditionModel.forward``'s signature; the config also records the
    ``cross_attention_dim`` and ``time_cond_proj_dim`` the diffusers pipelines read from a UNet's config."""

    unet_class = UNet2DConditionModel

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        levels: int = 8,
        phi: float = 0.5,
        per_channel: bool = False,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        tsm_steps: int = 0,
        residual_spikes: bool = False,
        threshold_groups: int = 1,
        offsets: bool = False,
        burst: int = 1,
        cross_attention_dim: int | None = None,
        time_cond_proj_dim: int | None = None,
        output_precision: int = 1,
        output_filter_size: int = 0,
        output_filter_groups: int = DEFAULT_FILTER_GROUPS,
    ):
        super().__init__(
            unet_config, levels, phi, per_channel, sample_size, in_channels, out_channels, tsm_steps,
            residual_spikes, threshold_groups, offsets, burst, output_precision, output_filter_size,
            output_filter_groups,
        )  # fmt: skip

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> UNet2DConditionOutput | tuple:
        conditioning = _conditioning(
            self, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
            cross_attention_kwargs, added_cond_kwargs, unsupported,
        )  # fmt: skip
        with self._timestep_groups(sample, timestep):
            out = self.unet(sample, timestep, **conditioning).sample
        out = self._filtered(out, sample, timestep)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class SpikingUNet2DConditionModel(SpikingUNet2DModel):
    """:class:`SpikingUNet2DModel` converted from a :class:`QCFSUNet2DConditionModel`: the same neurons,
    execution modes and options; ``encoder_hidden_states`` (and class labels, ``timestep_cond``) are constant
    over the T time steps. It drops into ``StableDiffusionPipeline`` in place of the UNet."""

    unet_class = UNet2DConditionModel

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        levels: int = 8,
        phi: float = 0.5,
        per_channel: bool = False,
        timesteps: int = 8,
        neuron: str = "if",
        nonlinear_mode: str = "compensated",
        execution: str = "batched",
        threshold_form: str = "lambda",
        time_embedding: str = "auto",
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        tsm: bool = False,
        residual_spikes: bool = False,
        analog_sites: list[str] | None = None,
        burst: int = 1,
        threshold_groups: int = 1,
        offsets: bool = False,
        cross_attention_dim: int | None = None,
        time_cond_proj_dim: int | None = None,
        nonlinear_steps: int | None = None,
        delta_spikes: bool = False,
        output_precision: int = 1,
        output_filter_size: int = 0,
        output_filter_groups: int = DEFAULT_FILTER_GROUPS,
    ):
        super().__init__(
            unet_config, levels, phi, per_channel, timesteps, neuron, nonlinear_mode, execution, threshold_form,
            time_embedding, sample_size, in_channels, out_channels, tsm, residual_spikes, analog_sites, burst,
            threshold_groups, offsets, nonlinear_steps, delta_spikes, output_precision, output_filter_size,
            output_filter_groups,
        )  # fmt: skip

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        spike_steps: int | None = None,
        **unsupported: Any,
    ) -> UNet2DConditionOutput | tuple:
        """Simulate ``spike_steps`` (T; default: the configured T) spiking steps on ``sample``."""
        conditioning = _conditioning(
            self, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
            cross_attention_kwargs, added_cond_kwargs, unsupported,
        )  # fmt: skip
        out = self._simulate(sample, timestep, conditioning, spike_steps)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


_QCFS_CLASSES = {UNet2DModel: QCFSUNet2DModel, UNet2DConditionModel: QCFSUNet2DConditionModel}
_SPIKING_CLASSES = {QCFSUNet2DModel: SpikingUNet2DModel, QCFSUNet2DConditionModel: SpikingUNet2DConditionModel}


def conditioning_config(model_class: type, unet_config: dict[str, Any]) -> dict[str, Any]:
    """The config entries a conditional model class adds (what diffusers' pipelines read from a UNet's
    config), taken from the wrapped UNet's config; none for the unconditional classes."""
    if model_class.unet_class is not UNet2DConditionModel:
        return {}
    return {key: unet_config.get(key) for key in ("cross_attention_dim", "time_cond_proj_dim")}


def _conditioning(
    model, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
    cross_attention_kwargs, added_cond_kwargs, unsupported: dict,
) -> dict[str, Any]:  # fmt: skip
    """Check a conditional model's inputs and return the UNet's keyword arguments (constant over time)."""
    given = sorted(key for key, value in unsupported.items() if value is not None)
    if given or added_cond_kwargs:
        names = given + (["added_cond_kwargs"] if added_cond_kwargs else [])
        raise ValueError(
            f"{type(model).__name__}: {', '.join(names)} not supported (ControlNet / T2I-adapter residuals, "
            "SDXL's added conditions and encoder attention masks are not converted)."
        )
    model._check_inputs(sample, timestep, class_labels)
    model._check_encoder_hidden_states(sample, encoder_hidden_states)
    return {
        "encoder_hidden_states": encoder_hidden_states,
        "class_labels": class_labels,
        "timestep_cond": timestep_cond,
        "attention_mask": attention_mask,
        "cross_attention_kwargs": cross_attention_kwargs,
    }


def _repeat_batched(value, num_steps: int, batch: int):
    """Repeat a per-sample tensor (timesteps, class labels) over the folded time dimension."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(num_steps, *([1] * (value.dim() - 1)))
    return value


def _check_conversion_arguments(qnet: Any, timesteps: Any, tsm: Any) -> None:
    """The model is a :class:`QCFSUNet2DModel` and ``timesteps`` an int in bounds (the model classes check the
    choices), else a ``TypeError`` / ``ValueError`` that names the argument."""
    if isinstance(qnet, SpikingUNet2DModel):
        raise TypeError("convert() takes a QCFSUNet2DModel; this model is already a SpikingUNet2DModel.")
    if isinstance(qnet, UNet2DModel | UNet2DConditionModel):
        raise TypeError(
            f"convert() takes a QCFSUNet2DModel, not a plain {type(qnet).__name__}: quantize it first, "
            "convert(quantize(unet, levels=L), spike_steps=T) (or calibrate() it)."
        )
    if not isinstance(qnet, QCFSUNet2DModel):
        raise TypeError(
            f"convert() takes a QCFSUNet2DModel (from quantize() or calibrate()), got {type(qnet).__name__}."
        )
    check_int(timesteps, "spike_steps", "timesteps")
    if tsm is not None:
        check_bool(tsm, "tsm")


def _check_offsets_with_groups(offsets: bool, threshold_groups: int) -> None:
    """Offsets are initialised with one threshold per site; with timestep-aware thresholds they are refused."""
    if offsets and int(threshold_groups) > 1:
        raise ValueError(
            f"offsets=True needs threshold_groups=1 (got {threshold_groups}): the offset initialisation fits one "
            "threshold per site; use one of the two options."
        )


def _check_settings(unet_config: Any, levels: Any, phi: Any) -> None:
    if not isinstance(unet_config, dict):
        raise TypeError(f"unet_config must be the dict of a UNet2DModel's config, got {type(unet_config).__name__}.")
    check_int(levels, "levels", "levels")
    check_float(phi, "phi", 0, 1)


def _check_nonlinear_steps(nonlinear_steps: Any, nonlinear_mode: str) -> None:
    """``nonlinear_steps``: ``None`` or a whole number >= 2, with compensated non-linear ops only."""
    if nonlinear_steps is None:
        return
    check_int(nonlinear_steps, "nonlinear_steps", low=2)
    if nonlinear_mode != "compensated":
        raise ValueError(
            f"nonlinear_steps={nonlinear_steps} holds compensated ops between evaluations; nonlinear_mode="
            f"{nonlinear_mode!r} has none. Use nonlinear_mode='compensated' or leave nonlinear_steps out."
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
