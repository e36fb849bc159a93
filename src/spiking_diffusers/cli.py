"""What every ``sdm-*`` command shares: error handling with documented exit codes, the common options,
and atomic output directories.

Exit codes: 0 success, 2 usage mistake (bad option, wrong path, not a model, unsupported architecture),
1 runtime failure, 130 interrupted. Expected mistakes print one line, ``Error: ...``, and no traceback (set
``SDM_DEBUG=1`` to see one). ``--output`` is checked before any work (:func:`check_output`); outputs are
written to a temporary directory beside the target and renamed into place only when complete, so an
interrupted or failed run leaves the previous result or nothing. Numeric options take their bounds from
:mod:`spiking_diffusers.validation`. ``docs/robustness.md`` lists every guarantee.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from spiking_diffusers_launcher import EXIT_INTERRUPTED, INTERRUPTED

from . import distributed
from .converter.building import unet_config_dict
from .converter.support import UnsupportedModuleError
from .converter.timestep_groups import check_threshold_groups
from .errors import SdmError
from .loading import LoadedModel, ModelLoadError, resolve_device
from .validation import BOUNDS, Bound

if TYPE_CHECKING:
    from .calibration.calibrate import CalibrationConfig
    from .calibration.policy import QCFSSource

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CommandError(click.ClickException):
    """A one-line error with an exit code (2: usage mistake, 1: runtime failure)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class SdmCommand(click.Command):
    """A click command that turns expected exceptions into one-line errors with the right exit code."""

    def make_context(self, *args, **kwargs) -> click.Context:
        """Parse the command line; a Ctrl-C / SIGTERM meanwhile exits 130 (click alone would say "Aborted!", 1)."""
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as err:
            raise CommandError(INTERRUPTED, exit_code=EXIT_INTERRUPTED) from err

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; expected failures become a :class:`CommandError` (SIGTERM: a ``KeyboardInterrupt``)."""
        # Python takes signal handlers in the main thread only; a command run from another thread (a notebook
        # worker, a test runner's thread) keeps the default SIGTERM behaviour.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if main_thread else None
        try:
            with _quiet_unless_main_process():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as err:
            raise CommandError(INTERRUPTED, exit_code=EXIT_INTERRUPTED) from err
        except SdmError as err:
            raise CommandError(str(err), exit_code=err.exit_code) from err
        except UnsupportedModuleError as err:
            raise CommandError(str(err), exit_code=2) from err
        except Exception as err:
            if os.environ.get("SDM_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CommandError(f"{message} (set SDM_DEBUG=1 for the traceback)", exit_code=1) from err
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet_unless_main_process() -> Iterator[None]:
    """Under ``accelerate launch`` only the main process prints its results (errors still reach stderr)."""
    if not distributed.launched() or distributed.is_main_process():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def sdm_command(name: str, **kwargs) -> Callable:
    """``@click.command`` named ``name`` (``"sdm-convert"``: the name its output marker records) with
    :class:`SdmCommand` and a ``--help`` that shows option defaults."""
    kwargs.setdefault("context_settings", {"show_default": True, "max_content_width": 100})
    return click.command(name, cls=SdmCommand, **kwargs)


class BoundedInt(click.IntRange):
    """An integer option in the range of a :data:`~spiking_diffusers.validation.BOUNDS` entry; a value
    outside it is a usage error that gives the range and why it is there."""

    def __init__(self, bound: Bound | str, low: int | None = None):
        self.bound = BOUNDS[bound] if isinstance(bound, str) else bound
        super().__init__(self.bound.low if low is None else low, self.bound.high)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as err:
            if "is not in the range" not in err.message:
                raise
            self.fail(f"{err.message.rstrip('.')} ({self.bound.why}).", param, ctx)


class TScheduleParam(click.ParamType):
    """A T or a T schedule (``4``, ``4,16x3``; see :mod:`spiking_diffusers.pipelines.t_schedule`): a plain
    integer stays an ``int`` with the bounds of :class:`BoundedInt`, anything else becomes a ``TSchedule``; a
    schedule that cannot work is a usage error naming the accepted form. Whether it fits the denoising steps is
    checked by :func:`check_t_schedule` once they are known."""

    name = "T_SCHEDULE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .pipelines.t_schedule import TSchedule, TScheduleError

        if isinstance(value, int | TSchedule):
            return value
        text = str(value).strip()
        if text.lstrip("+-").isdigit():
            return BoundedInt("timesteps").convert(text, param, ctx)
        try:
            return TSchedule.parse(text, name="the T schedule")
        except TScheduleError as err:
            self.fail(str(err), param, ctx)


def check_t_schedule(schedule: Any, steps: int, option: str) -> float | None:
    """The mean T per denoising step of ``schedule`` (an int, a ``TSchedule`` or ``None``: ``None``) over
    ``steps`` denoising steps, or a usage error (exit 2) naming ``option`` and the accepted form where the
    schedule does not fit them."""
    from .pipelines.t_schedule import TSchedule, TScheduleError

    if schedule is None:
        return None
    try:
        return TSchedule.coerce(schedule).mean(steps, name=option)
    except TScheduleError as err:
        raise CommandError(str(err), exit_code=2) from err


class FiniteFloat(click.FloatRange):
    """A float option that also refuses NaN and Inf (``click.FloatRange`` lets NaN through every bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def output_options(help_text: str) -> Callable:
    """``--output DIR`` (required) and ``--overwrite``, checked by :func:`check_output`."""

    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--overwrite",
            is_flag=True,
            help="Replace --output if it holds a previous output of this command (nothing else is ever replaced).",
        )(command)
        return click.option("--output", required=True, type=click.Path(), help=help_text)(command)

    return decorate


def model_option(
    help_text: str = "Hub id or local directory; default: the digits DDPM shipped in the package.",
) -> Callable:
    """``--model ID_OR_DIR`` (default ``None``: the shipped model), with the command's own ``help_text``."""
    return click.option("--model", "model", default=None, metavar="ID_OR_DIR", help=help_text)


def device_option(help_text: str = "Where to run: auto picks CUDA, then MPS, then CPU.") -> Callable:
    """``--device auto|cpu|cuda|mps`` (see :func:`get_device`)."""
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", help=help_text)


def calibration_options(command: Callable) -> Callable:
    """``--calibrate/--no-calibrate``, the four calibration sizes and the time budget, for commands that may
    calibrate an ANN."""
    from .calibration.calibrate import CalibrationConfig

    defaults = CalibrationConfig()
    options = [
        click.option(
            "--calibrate/--no-calibrate",
            default=True,
            help="Calibrate an uncalibrated ANN first with the sdm-calibrate recipe (minutes on a CPU for the "
            "shipped model); --no-calibrate uses percentile thresholds only: quick, and a poor network.",
        ),
        click.option("--calibration-samples", default=defaults.num_samples, type=BoundedInt("num_samples"),
                     help="Images drawn from the model to calibrate on."),
        click.option("--calibration-steps", default=defaults.distill.steps, type=click.IntRange(min=0),
                     help="QCFS distillation steps of the calibration."),
        click.option("--snn-steps", default=defaults.snn.steps, type=click.IntRange(min=0),
                     help="SNN-aware fine-tuning steps of the calibration."),
        click.option("--calibration-set-size", default=defaults.set_size, type=BoundedInt("set_size"),
                     help="Noised inputs (x_t, t) in the fixed calibration set, labelled once by the model."),
        calibration_budget_option(),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def calibration_budget_option() -> Callable:
    """``--calibration-budget MINUTES``: scale the calibration recipe down to an estimated run time."""
    return click.option(
        "--calibration-budget",
        default=None,
        type=FiniteFloat(min=0, min_open=True),
        metavar="MINUTES",
        help="Scale the calibration down so that its estimate, timed on this machine at the start, fits MINUTES "
        "(the training steps; the images and calibration set too where they would take over a third of it); "
        "prints and records what it scaled [default: the full recipe].",
    )


def residual_spikes_option() -> Callable:
    """``--residual-spikes/--no-residual-spikes``; ``None`` when not given (see :func:`resolve_residual_spikes`)."""
    return click.option(
        "--residual-spikes/--no-residual-spikes",
        default=None,
        help="Quantize an ANN with signed spike encoders in front of the layers that read real values (the "
        "shortcut, down- and up-sampling convolutions on the residual stream, the attention projections), so "
        "that the SNN feeds them spikes [default: on for an ANN that is calibrated, off with --no-calibrate; a QCFS or "
        "spiking model keeps its own].",
    )


def resolve_residual_spikes(requested: bool | None, loaded: LoadedModel) -> bool:
    """The residual-spikes setting for ``loaded`` (see :func:`_resolve_model_flag`)."""
    return _resolve_model_flag(requested, loaded, "residual_spikes", "residual-spikes", "residual spikes")


def _resolve_model_flag(requested: bool | None, loaded: LoadedModel, key: str, flag: str, what: str) -> bool:
    """An on/off setting of how an ANN is quantized: an ANN takes ``requested`` (off when ``None``); a QCFS or
    spiking model keeps its own (config ``key``), and asking for the other setting is a usage error."""
    if loaded.kind == "ann":
        return bool(requested)
    own = bool(loaded.unet.config.get(key, False))
    if requested is not None and requested != own:
        given = f"--{flag}" if requested else f"--no-{flag}"
        kind = "QCFS" if loaded.kind == "qcfs" else "spiking"
        state = "with" if own else "without"
        raise CommandError(f"{given}: {loaded.source} is a {kind} model {state} {what}; it keeps them so.", 2)
    return own


def threshold_groups_option(default: int | None = None) -> Callable:
    """``--threshold-groups K`` (timestep-aware thresholds); ``None`` when not given and ``default`` is ``None``
    (see :func:`resolve_threshold_groups`)."""
    own = "" if default is not None else " [default: 1 for an ANN; a QCFS or spiking model keeps its own]"
    return click.option(
        "--threshold-groups",
        default=default,
        show_default=default is not None,
        type=BoundedInt("threshold_groups"),
        metavar="K",
        help="Timestep-aware thresholds: K thresholds per site, one per equal range of the diffusion schedule, "
        f"chosen by each sample's timestep (1: one threshold per site){own}.",
    )


def burst_option(own_model: bool = False) -> Callable:
    """``--burst B``: multi-threshold neurons (and encoders) emitting up to B spikes per time step; ``None``
    when not given (the recipe's default, or a QCFS or spiking model's own)."""
    own = "; a QCFS or spiking model keeps its own" if own_model else ""
    return click.option(
        "--burst",
        default=None,
        type=click.IntRange(1, 64),
        metavar="B",
        help="Burst neurons: up to B spikes per time step, B x T levels in T steps (L = B x T; plain IF only). "
        f"Each spike is one accumulate [default: 4 for plain IF, 1 for signed IF or an -L other than 4T{own}].",
    )


def output_precision_option(own_model: bool = False) -> Callable:
    """``--output-precision P``: the output activation's levels (and spikes per step) as a multiple of the others';
    ``None`` when not given (the recipe's default, or a QCFS or spiking model's own)."""
    own = "; a QCFS or spiking model keeps its own" if own_model else ""
    return click.option(
        "--output-precision",
        default=None,
        type=click.IntRange(1, 64),
        metavar="P",
        help="Give the output activation (the unit in front of conv_out) P x the levels of the others, and its "
        "neurons P x the spikes per step: the first denoising steps need its precision, and its spikes feed only "
        f"the output convolution; plain IF only [default: 1{own}].",
    )


def output_filter_option(own_model: bool = False) -> Callable:
    """``--output-filter K``: the kernel size of the per-timestep output filter calibration fits (0: none);
    ``None`` when not given (the recipe's default, or a QCFS or spiking model's own)."""
    own = "; a QCFS or spiking model keeps its own" if own_model else ""
    return click.option(
        "--output-filter",
        default=None,
        type=click.IntRange(0, 15),
        metavar="K",
        help="Fit a K x K linear filter over the noise prediction and the input, one per range of the schedule, "
        "to the original model's output (least squares, after distillation): it removes most of the error the "
        f"first denoising steps amplify. Odd K, 0 for none; real-valued work, counted [default: 5{own}].",
    )


def resolve_threshold_groups(requested: int | None, loaded: LoadedModel) -> int:
    """K for ``loaded``: an ANN takes ``requested`` (1 when ``None``), which must fit its schedule; a QCFS or
    spiking model keeps its own, and asking for another K is a usage error."""
    if loaded.kind == "ann":
        value = 1 if requested is None else requested
        try:
            return check_threshold_groups(value, unet_config_dict(loaded.unet), name="--threshold-groups")
        except ValueError as err:
            raise CommandError(str(err), 2) from err
    own = int(loaded.unet.config.threshold_groups)
    if requested is not None and requested != own:
        kind = "QCFS" if loaded.kind == "qcfs" else "spiking"
        raise CommandError(
            f"--threshold-groups {requested}: {loaded.source} is a {kind} model with {own} timestep threshold "
            f"group(s); it keeps them (leave the option out, or pass --threshold-groups {own}).",
            2,
        )
    return own


def offsets_option() -> Callable:
    """``--offsets/--no-offsets``; ``None`` when not given (see :func:`resolve_offsets`)."""
    return click.option(
        "--offsets/--no-offsets",
        default=None,
        help="Quantize an ANN with a learned input shift and output offset per activation unit, "
        "qcfs(z - shift) + offset, so that units reach below 0 like SiLU; free in the SNN (a bias current and "
        "a bias map of the next layer) [default: on for an ANN that is calibrated (a UNet2DModel with one threshold "
        "group), off with --no-calibrate; a QCFS or spiking model keeps its own].",
    )


def delta_spikes_option() -> Callable:
    """``--delta-spikes/--no-delta-spikes``; ``None`` when not given (each command says what it then does)."""
    return click.option(
        "--delta-spikes/--no-delta-spikes",
        default=None,
        help="Links from neurons to weight layers send the change of each time step's spikes from the previous "
        "UNet evaluation; each layer keeps its T input currents. Same samples, far fewer accumulates over a "
        "sampling run [default: on; a spiking model given to sdm-energy keeps its own].",
    )


def resolve_offsets(requested: bool | None, loaded: LoadedModel) -> bool:
    """The offsets setting for ``loaded`` (see :func:`_resolve_model_flag`)."""
    return _resolve_model_flag(requested, loaded, "offsets", "offsets", "offsets")


def calibration_config(
    calibrate: bool,
    calibration_samples: int,
    calibration_steps: int,
    snn_steps: int,
    neuron: str | None = None,
    residual_spikes: bool | None = None,
    threshold_groups: int | None = None,
    budget_minutes: float | None = None,
    burst: int | None = None,
    output_precision: int | None = None,
    output_filter: int | None = None,
    set_size: int | None = None,
) -> CalibrationConfig | None:
    """The :class:`CalibrationConfig` the :func:`calibration_options` ask for (``None``: do not calibrate)."""
    import dataclasses

    from .calibration.calibrate import CalibrationConfig

    if not calibrate:
        if output_filter:
            raise CommandError(
                f"--output-filter {output_filter} is fitted by calibration; leave out --no-calibrate (or the option).",
                2,
            )
        return None
    config = CalibrationConfig(num_samples=calibration_samples, budget_minutes=budget_minutes)
    config.set_size = set_size or config.set_size
    config.neuron = neuron or config.neuron
    if residual_spikes is not None:  # else the recipe's default (on where supported)
        config.residual_spikes = residual_spikes
    config.threshold_groups = threshold_groups or config.threshold_groups
    config.burst = burst
    if output_precision is not None:
        config.output_precision = output_precision
    if output_filter is not None:
        if output_filter % 2 == 0 and output_filter:
            raise CommandError(
                f"--output-filter must be 0 (none) or odd, a filter centred on each pixel; got {output_filter}.", 2
            )
        config.output_filter = output_filter
    config.distill = dataclasses.replace(config.distill, steps=calibration_steps)
    config.snn = dataclasses.replace(config.snn, steps=snn_steps)
    return config


def conversion_source(
    loaded: LoadedModel,
    timesteps: int,
    calibration: CalibrationConfig | None,
    levels: int | None = None,
    per_channel: bool | None = None,
    residual_spikes: bool | None = None,
    seed: int = 0,
    threshold_groups: int | None = None,
    offsets: bool | None = None,
    output_precision: int | None = None,
) -> QCFSSource:
    """The QCFS network a command converts from what it loaded (one path for every command: see
    :func:`spiking_diffusers.calibration.policy.qcfs_network`), with a conflict between an option and the
    model's own setting as a usage error. Prints what is converted."""
    from .calibration.policy import ConversionSourceError, qcfs_network

    if threshold_groups is not None:  # K must fit an ANN's schedule; a QCFS or spiking model keeps its own
        threshold_groups = resolve_threshold_groups(threshold_groups, loaded)
    if offsets is not None:  # a QCFS or spiking model keeps its own
        offsets = resolve_offsets(offsets, loaded)
    if residual_spikes is not None:
        residual_spikes = resolve_residual_spikes(residual_spikes, loaded)
    if calibration is not None and loaded.kind == "ann" and loaded.text_conditioned:
        raise CommandError(
            f"{loaded.source}: calibrating a text-conditioned UNet needs prompts, which the commands do not take "
            "yet; pass --no-calibrate (percentile thresholds on random encoder_hidden_states), or calibrate in "
            "Python (docs/conditional.md).",
            2,
        )
    try:
        source = qcfs_network(
            loaded.unet,
            dict(loaded.scheduler.config),
            timesteps=timesteps,
            levels=levels,
            per_channel=per_channel,
            seed=seed,
            calibration=calibration,
            residual_spikes=residual_spikes,
            progress=distributed.is_main_process(),
            threshold_groups=threshold_groups,
            offsets=offsets,
            label_tokens=loaded.label_tokens,
            output_precision=output_precision,
        )
    except ConversionSourceError as err:
        raise CommandError(f"{loaded.source}: {err} Leave the option out to use the model's own.", 2) from err
    except ValueError as err:  # a unit-threshold-form spiking model does not map back onto a QCFS network
        raise CommandError(f"{loaded.source}: {err}", 2) from err
    click.echo(f"Converting {source.description} ({loaded.source})")
    return source


def get_device(name: str) -> torch.device:
    """The ``--device``; under ``accelerate launch``, the device the launcher gave this process."""
    if distributed.launched():
        given = distributed.device()
        if name not in ("auto", given.type):
            raise CommandError(
                f"Under accelerate launch each process runs on the device it is given ({given}); leave out --device.",
                exit_code=2,
            )
        return given
    try:
        return resolve_device(name)
    except ModelLoadError as err:
        raise CommandError(str(err), exit_code=2) from err


def check_scheduler_steps(scheduler: Any, steps: int, option: str) -> None:
    """``option`` (denoising steps) refused before any sampling where ``scheduler`` cannot take it: the bound
    and why (see :func:`spiking_diffusers.pipelines.schedulers.check_steps`), exit 2."""
    from .pipelines.schedulers import check_steps

    try:
        check_steps(scheduler, steps, option)
    except ValueError as err:
        raise CommandError(str(err), exit_code=2) from err


def option_given(name: str) -> bool:
    """Whether the running command's option ``name`` was passed on the command line (not left at its default)."""
    return click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def class_labels_option() -> Callable:
    """``--class-labels 0,1,...``: the labels of a class- or label-conditional model, image i taking label
    ``i mod count`` (see :func:`resolve_class_labels`)."""
    return click.option(
        "--class-labels",
        default=None,
        metavar="C[,C...]",
        help="Conditional models: image i gets label C[i mod count] [default: every class in turn, 0, 1, ...].",
    )


def num_classes(loaded: LoadedModel) -> int | None:
    """How many class labels ``loaded`` takes: its label tokens' classes, or a class-conditional UNet's
    ``num_class_embeds``; ``None`` for a model without labels."""
    if loaded.label_tokens is not None:
        return int(loaded.label_tokens.config.num_classes)
    config = loaded.unet.config
    own = config.get("unet_config", config)  # a QCFS or spiking model keeps the original's config
    count = own.get("num_class_embeds")
    return int(count) if count else None


def resolve_class_labels(value: str | None, loaded: LoadedModel, option: str = "--class-labels") -> list[int] | None:
    """The labels to cycle through for ``loaded``: ``value`` checked against its classes, every class in turn
    when not given, ``None`` for a model that takes none. A text-conditioned model is a usage error (the
    commands take no prompts)."""
    if loaded.text_conditioned:
        raise CommandError(
            f"{loaded.source} is conditioned on text (a cross-attention UNet without label tokens): the commands "
            "take no prompts; sample it with diffusers' DiffusionPipeline.from_pretrained (docs/conditional.md).",
            2,
        )
    count = num_classes(loaded)
    if count is None:
        if value is not None:
            raise CommandError(f"{option}: {loaded.source} is unconditional; it takes no class labels.", 2)
        return None
    if value is None:
        return list(range(count))
    try:
        labels = [int(item) for item in value.split(",") if item.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from err
    if not labels or min(labels) < 0 or max(labels) >= count:
        raise click.BadParameter(
            f"expected labels in 0..{count - 1} ({loaded.source} has {count} classes), got {value!r}", param_hint=option
        )
    return labels


def check_guidance(scales: list[float], loaded: LoadedModel, option: str = "--guidance-scale") -> None:
    """Classifier-free guidance (a scale other than 1) needs a null condition: label tokens."""
    if any(scale != 1 for scale in scales) and loaded.label_tokens is None:
        raise CommandError(
            f"{option}: classifier-free guidance needs a label-conditional model (a cross-attention UNet with "
            f"label_tokens, whose null token is the unconditional input); {loaded.source} has none. Leave it at 1.",
            2,
        )


def parse_float_list(value: str, name: str, positive: bool = True) -> list[float]:
    """``"0.99,1.0"`` -> ``[0.99, 1.0]``, with a usage error naming the option on bad input."""
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=name) from err
    if not values:
        raise click.BadParameter("expected at least one number", param_hint=name)
    if positive and any(not (v > 0) or v != v or v == float("inf") for v in values):
        raise click.BadParameter(f"every value must be a finite number > 0, got {value!r}", param_hint=name)
    return values


OUTPUT_MARKER = ".sdm-output.json"
"""The file each command writes into its output directory (``{"command": "sdm-convert", "version": ...}``).
``--overwrite`` replaces a directory only when it holds this marker naming the same command: a previous
output of that command. Any other non-empty directory is the user's and is never replaced."""

WRITE_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def package_dir() -> Path:
    """The installed ``spiking_diffusers`` package, with the models it ships (never an output)."""
    return Path(__file__).resolve().parent


def _command_name() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.command.name if ctx is not None and ctx.command.name else "sdm"


def output_marker(directory: Path) -> str | None:
    """The command named by the :data:`OUTPUT_MARKER` in ``directory`` (``None``: no readable marker)."""
    try:
        data = json.loads((directory / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def _relation(output: Path, other: Path) -> str | None:
    if output == other:
        return "is"
    if other in output.parents:
        return "is inside"
    if output in other.parents:
        return "contains"
    return None


def check_output(
    output: str | os.PathLike | None,
    overwrite: bool,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    command: str | None = None,
) -> Path:
    """Refuse an ``--output`` that cannot be written without destroying something, before any work.

    Usage errors (exit 2) for: an empty path (an unset shell variable would otherwise mean "here"); a path
    that is, is inside or contains one of ``inputs`` (``{"--model": path, ...}``: replacing it would delete
    the input) or the installed package with its shipped models; an existing file; an existing non-empty
    directory that is not a previous output of ``command`` (no :data:`OUTPUT_MARKER` of it), even with
    ``--overwrite``; a previous output without ``--overwrite``; a parent that cannot be written. Returns the
    resolved path.
    """
    command = command or _command_name()
    if output is None or not str(output).strip():
        raise CommandError(
            "--output is empty; pass the directory to write (an unset shell variable gives an empty path).", 2
        )
    target = Path(output).expanduser().resolve()
    protected = dict(inputs or {})
    protected["the installed spiking-diffusers package (with its shipped models)"] = package_dir()
    for label, path in protected.items():
        if path is None or not str(path).strip() or not Path(path).expanduser().exists():
            continue  # a hub id, the default, or a missing path that the command reports itself
        resolved = Path(path).expanduser().resolve()
        relation = _relation(target, resolved)
        if relation is not None:
            what = label if label.startswith("the ") else f"{label} {resolved}"
            raise CommandError(
                f"--output {target} {relation} {what}; writing there would destroy it. Choose another --output.", 2
            )
    if target.exists() and not target.is_dir():
        raise CommandError(f"--output {target} exists and is a file; pass a directory path.", exit_code=2)
    try:
        occupied = target.is_dir() and any(target.iterdir())
    except OSError as err:
        raise CommandError(f"Cannot read --output {target}: {err.strerror}; choose another --output.", 2) from err
    if occupied:
        if output_marker(target) != command:
            raise CommandError(
                f"--output {target} exists and holds files that are not a previous {command} output (it has no "
                f"{OUTPUT_MARKER} of {command}); they are never replaced: choose a new or empty directory.",
                exit_code=2,
            )
        if not overwrite:
            raise CommandError(
                f"--output {target} holds a previous {command} output; pass --overwrite to replace it.", exit_code=2
            )
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"--output {target}: {existing} is a file, not a directory.", exit_code=2)
    unwritable = f"--output {target}: {existing} cannot be written"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{unwritable} (permission denied or a read-only file system); choose a writable place.", 2)
    try:  # what access() cannot tell (root on a read-only mount, special file systems): try it
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=existing))
    except OSError as err:
        raise CommandError(f"{unwritable} ({err.strerror or err}); choose a writable place.", 2) from err
    return target


def _write_error(target: Path, err: OSError) -> CommandError:
    """A failure to write ``--output``, named after it (not after the hidden staging directory)."""
    reason = err.strerror or str(err)
    if err.errno in WRITE_DENIED:
        return CommandError(f"Cannot write --output {target}: {reason}; choose a writable place.", exit_code=2)
    return CommandError(f"Cannot write --output {target}: {reason}.", exit_code=1)


def _within(err: OSError, directory: Path) -> bool:
    names = [name for name in (err.filename, err.filename2) if name is not None]
    return any(Path(os.fsdecode(name)).resolve().is_relative_to(directory) for name in names if name != "")


def _default_directory_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask (``mkdtemp`` gives 0700)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, command: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` only on success.

    ``target`` is checked first (:func:`check_output`: only a previous output of ``command``, the running
    command by default, is ever replaced, and only with ``overwrite``). The result holds the
    :data:`OUTPUT_MARKER` and has the mode a new directory gets under the umask. On any failure (including
    Ctrl-C / SIGTERM) the temporary directory is removed and ``target`` keeps its previous content, or does
    not exist. Under ``accelerate launch`` the other processes get a private scratch directory, discarded
    afterwards: only the main process writes ``target``.
    """
    command = command or _command_name()
    target = check_output(target, overwrite, command=command)
    if not distributed.is_main_process():  # under accelerate launch only the main process writes the output
        with tempfile.TemporaryDirectory(prefix="sdm-scratch-") as scratch:
            yield Path(scratch)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise _write_error(target, err) from err
    try:
        try:
            staging.chmod(_default_directory_mode())
            yield staging
            from . import __version__

            marker = {"command": command, "version": __version__}
            (staging / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n")
            with signals_deferred():  # never stop between moving the old result away and moving the new one in
                if target.exists():
                    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                    target.rename(old / "previous")
                    try:
                        staging.rename(target)
                    except OSError:
                        (old / "previous").rename(target)  # put the previous output back
                        raise
                    finally:
                        shutil.rmtree(old, ignore_errors=True)
                else:
                    staging.rename(target)
        except OSError as err:
            if _within(err, staging) or _within(err, target):
                raise _write_error(target, err) from err
            raise
    finally:
        with signals_deferred():  # a second Ctrl-C must not leave the staging directory half deleted
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs and raise ``KeyboardInterrupt`` after it if one came.

    For short critical sections (renames, clean-up) that must not be cut in half. Outside the main thread,
    where Python delivers no signals, it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt
