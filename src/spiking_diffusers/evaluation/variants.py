"""The networks an evaluation compares: the ANN, its QCFS network at each L and its spiking network at each T.

:func:`prepare_variants` is the one place where they are built, whatever the user passed:

- an original ``UNet2DModel``: it is the ANN; QCFS networks come from
  :func:`~spiking_diffusers.calibration.policy.qcfs_network`, the same step as ``sdm-convert`` (the
  calibration recipe, or percentile thresholds only), and spiking networks from
  :func:`~spiking_diffusers.convert`;
- a ``QCFSUNet2DModel`` (e.g. a calibrated one): it is the QCFS network at its own L, converted at each T;
  it does not contain the original network, so the ANN comes from ``reference`` (the shipped model by
  default) and must have the same architecture;
- a ``SpikingUNet2DModel``: it is simulated at each T; its QCFS network is recovered from its weights
  (lambda threshold form only), and the ANN again comes from ``reference``.

A T schedule (``"4,16x3"``: T per denoising step, see :mod:`spiking_diffusers.pipelines.t_schedule`) adds one
more spiking variant, sampled with its step's T at every denoising step, from the QCFS network at L =
``levels`` or the T most of its steps take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from ..calibration.calibrate import CalibrationConfig
from ..calibration.policy import default_levels, qcfs_network
from ..converter import QCFSUNet2DModel, SpikingUNet2DModel, convert
from ..converter.building import unet_config_dict
from ..label_tokens import LabelTokens
from ..pipelines.t_schedule import TSchedule


class VariantError(ValueError):
    """The requested comparison does not fit the given models; the message says why."""


@dataclass
class Variant:
    """One network to sample from: ``kind`` is "ann", "qcfs" or "snn"; ``timesteps`` is the SNN's T, or
    ``t_schedule`` its T per denoising step."""

    name: str
    kind: str
    unet: nn.Module
    levels: int | None = None
    timesteps: int | None = None
    t_schedule: TSchedule | None = None

    @property
    def forward_kwargs(self) -> dict:
        """Extra arguments of the pipeline (the simulation length of a spiking UNet: a T or a T schedule)."""
        if self.kind != "snn":
            return {}
        return {"spike_steps": self.t_schedule if self.t_schedule is not None else self.timesteps}

    @property
    def t_label(self) -> int | str | None:
        """T as the report gives it: an int, or a schedule's text form."""
        return str(self.t_schedule) if self.t_schedule is not None else self.timesteps

    def mean_timesteps(self, steps: int) -> float | None:
        """The mean T per denoising step over ``steps`` steps (``None`` for an ANN or QCFS network)."""
        if self.kind != "snn":
            return None
        return self.t_schedule.mean(steps) if self.t_schedule is not None else float(self.timesteps)


def prepare_variants(
    model: nn.Module,
    reference: UNet2DModel | None,
    timesteps: list[int],
    levels: int | None = None,
    neuron: str | None = None,
    execution: str = "batched",
    scheduler_config: dict | None = None,
    calibration: CalibrationConfig | None = None,
    residual_spikes: bool | None = None,
    t_schedules: list[TSchedule | str] | None = None,
    threshold_groups: int | None = None,
    label_tokens: LabelTokens | None = None,
) -> list[Variant]:
    """ANN first, then for each T in ``timesteps``: the QCFS network (L = ``levels``, else B x T of the
    recipe) and the SNN at T; then an SNN for each of ``t_schedules`` (non-constant T schedules; a constant
    one joins ``timesteps``).

    ``model`` is the network the user passed (ANN, QCFS or SNN); ``reference`` is the ANN to compare a
    QCFS or SNN model against (ignored for an ANN ``model``). ``neuron`` ("if" or "signed_if") applies to
    conversions; a spiking ``model`` keeps its own. ``execution`` ("batched" or "stepwise") is how every
    spiking network simulates time: the same result, at different speed and memory (step-wise is faster on
    CPUs). ``scheduler_config`` is the model's noise schedule, for the QCFS preparation, and ``calibration``
    the recipe it calibrates an ANN with at each L (``None``: percentile thresholds only). ``residual_spikes``
    is how an ANN is quantized (``None``: as ``calibration`` says, else off); a QCFS or spiking ``model``
    keeps its own, and asking for the other setting is a :class:`VariantError`; so is ``threshold_groups`` (K
    timestep-aware thresholds per site; ``None``: as ``calibration`` says, else 1). A QCFS network shared by
    several T appears once. ``label_tokens`` condition a label-conditional ANN's calibration.
    """
    schedules, timesteps = _split_schedules(t_schedules, list(timesteps or []))
    if (not timesteps and not schedules) or (timesteps and min(timesteps) < 1):
        raise VariantError(f"timesteps must be a non-empty list of integers >= 1, got {timesteps}.")
    if isinstance(model, (SpikingUNet2DModel, QCFSUNet2DModel)):
        _check_residual_spikes(model, residual_spikes)
        _check_threshold_groups(model, threshold_groups)
    if isinstance(model, SpikingUNet2DModel):
        model.set_execution(execution)
        return _from_snn(model, _checked_reference(model, reference), timesteps, levels, neuron, schedules)
    if isinstance(model, QCFSUNet2DModel):
        snn_options = {"neuron": neuron or "if", "execution": execution}
        return _from_qcfs(model, _checked_reference(model, reference), timesteps, levels, snn_options, schedules)
    variants = [Variant("ANN", "ann", model)]
    qnets: dict[int, QCFSUNet2DModel] = {}
    snns: dict[int, SpikingUNet2DModel] = {}
    for t in [*timesteps, *schedules]:
        schedule = t if isinstance(t, TSchedule) else None
        t = schedule.base if schedule is not None else t
        level = int(levels or default_levels(t, calibration))
        if level not in qnets:
            qnets[level] = qcfs_network(
                model,
                scheduler_config,
                timesteps=t,
                levels=level,
                calibration=calibration,
                residual_spikes=residual_spikes,
                threshold_groups=threshold_groups,
                label_tokens=label_tokens,
            ).qnet
            snns[level] = convert(qnets[level], spike_steps=t, neuron=neuron or "if", execution=execution)
            variants.append(Variant(f"QCFS L={level}", "qcfs", qnets[level], levels=level))
        variants.append(_snn_variant(snns[level], level, schedule or t))
    return variants


def _split_schedules(t_schedules, timesteps: list[int]) -> tuple[list[TSchedule], list[int]]:
    """The non-constant schedules, and ``timesteps`` with the T of every constant one added (once)."""
    schedules: list[TSchedule] = []
    for value in t_schedules or []:
        try:
            schedule = TSchedule.coerce(value, "t_schedules")
        except (TypeError, ValueError) as err:
            raise VariantError(str(err)) from err
        constant = schedule.constant_timesteps
        if constant is not None:
            timesteps.append(constant)
        elif str(schedule) not in map(str, schedules):
            schedules.append(schedule)
    return schedules, list(dict.fromkeys(timesteps))


def _snn_variant(snn, level: int, t: int | TSchedule) -> Variant:
    if isinstance(t, TSchedule):
        return Variant(f"SNN T={t}", "snn", snn, levels=level, t_schedule=t)
    return Variant(f"SNN T={t}", "snn", snn, levels=level, timesteps=t)


def _all_timesteps(timesteps: list[int], schedules: list[TSchedule]) -> list[int]:
    return sorted(set(timesteps).union(*(schedule.values() for schedule in schedules)))


def _from_qcfs(qnet, ann, timesteps, levels, snn_options, schedules=()) -> list[Variant]:
    level = int(qnet.config.levels)
    if levels is not None and levels != level:
        raise VariantError(f"The QCFS model has L = {level}; --levels {levels} cannot change it.")
    every_t = _all_timesteps(timesteps, list(schedules))
    _check_tsm_timesteps(int(qnet.config.get("tsm_steps") or 0), every_t)
    snn = convert(qnet, spike_steps=max(every_t), **snn_options)
    variants = [Variant("ANN", "ann", ann), Variant(f"QCFS L={level}", "qcfs", qnet, levels=level)]
    return variants + [_snn_variant(snn, level, t) for t in [*timesteps, *schedules]]


def _check_tsm_timesteps(tsm_steps: int, timesteps: list[int]) -> None:
    """A model with temporal factors (TSM) simulates only the T its factors were learned for."""
    if tsm_steps and set(timesteps) != {tsm_steps}:
        raise VariantError(f"The model's temporal factors (TSM) are for T = {tsm_steps}; pass --timesteps {tsm_steps}.")


def _from_snn(snn, ann, timesteps, levels, neuron, schedules=()) -> list[Variant]:
    config = snn.config
    _check_tsm_timesteps(int(config.timesteps) if config.tsm else 0, _all_timesteps(timesteps, list(schedules)))
    level = int(config.levels)
    if levels is not None and levels != level:
        raise VariantError(f"The spiking model has L = {level}; --levels {levels} cannot change it.")
    if neuron is not None and neuron != config.neuron:
        raise VariantError(f"The spiking model has {config.neuron} neurons; --neuron {neuron} cannot change them.")
    variants = [Variant("ANN", "ann", ann)]
    if config.threshold_form == "lambda":
        qnet = snn.to_qcfs()
        variants.append(Variant(f"QCFS L={level}", "qcfs", qnet.eval(), levels=level))
    return variants + [_snn_variant(snn, level, t) for t in [*timesteps, *schedules]]


def _check_residual_spikes(model: QCFSUNet2DModel | SpikingUNet2DModel, requested: bool | None) -> None:
    own = bool(model.config.residual_spikes)
    if requested is not None and requested != own:
        has = "has" if own else "has no"
        raise VariantError(
            f"The {type(model).__name__} {has} residual spikes; residual_spikes={requested} cannot change that."
        )


def _check_threshold_groups(model: QCFSUNet2DModel | SpikingUNet2DModel, requested: int | None) -> None:
    own = int(model.config.threshold_groups)
    if requested is not None and requested != own:
        raise VariantError(
            f"threshold_groups={requested} does not match the {type(model).__name__}, which has threshold_groups="
            f"{own} (timestep-aware thresholds are set when quantizing or calibrating); leave it out."
        )


def _checked_reference(model, reference: UNet2DModel | None) -> UNet2DModel:
    kind = type(model).__name__
    if not isinstance(reference, UNet2DModel | UNet2DConditionModel):
        raise VariantError(f"A {kind} does not contain the original network; pass the ANN as the reference model.")
    ours = json.loads(json.dumps(dict(model.config.unet_config), sort_keys=True, default=str))
    theirs = json.loads(json.dumps(unet_config_dict(reference), sort_keys=True, default=str))
    if ours != theirs:
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise VariantError(
            f"The reference ANN's architecture differs from the {kind}'s ({', '.join(differing)}); "
            "pass the model it was converted from with --reference-model."
        )
    return reference
