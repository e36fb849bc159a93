"""What every ``sdm-*`` command shares: error handling with documented exit codes, the common options,
and atomic output directories.

Exit codes: 0 success, 2 usage mistake (bad option, wrong path, not a model, unsupported architecture),
1 runtime failure. Expected mistakes print one line, ``Error: ...``, and no traceback (set
``SDM_DEBUG=1`` to see one). Outputs are written to a temporary directory beside the target and renamed
into place only when complete, so an interrupted or failed run leaves the previous result or nothing.
"""

from __future__ import annotations

import contextlib
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

from . import distributed
from .converter.support import UnsupportedModuleError
from .errors import SdmError
from .loading import LoadedModel, ModelLoadError, resolve_device

if TYPE_CHECKING:
    from .calibration.calibrate import CalibrationConfig

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CommandError(click.ClickException):
    """A one-line error with an exit code (2: usage mistake, 1: runtime failure)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class SdmCommand(click.Command):
    """A click command that turns expected exceptions into one-line errors with the right exit code."""

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
            raise CommandError("Interrupted; no partial output was written.", exit_code=130) from err
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


def sdm_command(**kwargs) -> Callable:
    """``@click.command`` with :class:`SdmCommand` and a ``--help`` that shows option defaults."""
    kwargs.setdefault("context_settings", {"show_default": True, "max_content_width": 100})
    return click.command(cls=SdmCommand, **kwargs)


def model_option(
    help_text: str = "Hub id or local directory; default: the digits DDPM shipped in the package.",
) -> Callable:
    """``--model ID_OR_DIR`` (default ``None``: the shipped model), with the command's own ``help_text``."""
    return click.option("--model", "model", default=None, metavar="ID_OR_DIR", help=help_text)


def device_option() -> Callable:
    """``--device auto|cpu|cuda|mps`` (see :func:`get_device`)."""
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda", "mps"]),
        default="auto",
        help="Where to run: auto picks CUDA, then MPS, then CPU.",
    )


def calibration_options(command: Callable) -> Callable:
    """``--calibrate/--no-calibrate`` and the three calibration sizes, for commands that may calibrate an ANN."""
    from .calibration.calibrate import CalibrationConfig

    defaults = CalibrationConfig()
    options = [
        click.option(
            "--calibrate/--no-calibrate",
            default=True,
            help="Calibrate an uncalibrated ANN first with the sdm-calibrate recipe (minutes on a CPU for the "
            "shipped model); --no-calibrate uses percentile thresholds only: quick, and a poor network.",
        ),
        click.option("--calibration-samples", default=defaults.num_samples, type=click.IntRange(min=1),
                     help="Images drawn from the model to calibrate on."),
        click.option("--calibration-steps", default=defaults.distill.steps, type=click.IntRange(min=0),
                     help="QCFS distillation steps of the calibration."),
        click.option("--snn-steps", default=defaults.snn.steps, type=click.IntRange(min=0),
                     help="SNN-aware fine-tuning steps of the calibration."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def residual_spikes_option() -> Callable:
    """``--residual-spikes/--no-residual-spikes``; ``None`` when not given (see :func:`resolve_residual_spikes`)."""
    return click.option(
        "--residual-spikes/--no-residual-spikes",
        default=None,
        help="Quantize an ANN with signed spike encoders in front of the layers that read real values (the "
        "shortcut, down- and up-sampling convolutions on the residual stream, the attention projections), so "
        "that the SNN feeds them spikes [default: off for an ANN; a QCFS or spiking model keeps its own].",
    )


def resolve_residual_spikes(requested: bool | None, loaded: LoadedModel) -> bool:
    """The residual-spikes setting for ``loaded``: an ANN takes ``requested`` (off when ``None``); a QCFS or
    spiking model keeps its own, and asking for the other setting is a usage error."""
    if loaded.kind == "ann":
        return bool(requested)
    own = bool(loaded.unet.config.residual_spikes)
    if requested is not None and requested != own:
        flag = "--residual-spikes" if requested else "--no-residual-spikes"
        kind = "QCFS" if loaded.kind == "qcfs" else "spiking"
        state = "with" if own else "without"
        raise CommandError(f"{flag}: {loaded.source} is a {kind} model {state} residual spikes; it keeps them so.", 2)
    return own


def calibration_config(
    calibrate: bool,
    calibration_samples: int,
    calibration_steps: int,
    snn_steps: int,
    neuron: str | None = None,
    residual_spikes: bool | None = None,
) -> CalibrationConfig | None:
    """The :class:`CalibrationConfig` the :func:`calibration_options` ask for (``None``: do not calibrate)."""
    import dataclasses

    from .calibration.calibrate import CalibrationConfig

    if not calibrate:
        return None
    config = CalibrationConfig(num_samples=calibration_samples)
    config.neuron = neuron or config.neuron
    config.residual_spikes = bool(residual_spikes)
    config.distill = dataclasses.replace(config.distill, steps=calibration_steps)
    config.snn = dataclasses.replace(config.snn, steps=snn_steps)
    return config


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


def option_given(name: str) -> bool:
    """Whether the running command's option ``name`` was passed on the command line (not left at its default)."""
    return click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


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


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; rename it to ``target`` only on success.

    On any failure (including Ctrl-C / SIGTERM) the temporary directory is removed and ``target`` keeps
    its previous content, or does not exist. Under ``accelerate launch`` the other processes get a private
    scratch directory, discarded afterwards: only the main process writes ``target``.
    """
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise CommandError(f"--output {target} exists and is a file; pass a directory path.", exit_code=2)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CommandError(f"--output {target} exists and is not empty; pass --overwrite to replace it.", exit_code=2)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"Cannot create the parent of --output {target}: {err.strerror}.", exit_code=2) from err
    if not distributed.is_main_process():  # under accelerate launch only the main process writes the output
        with tempfile.TemporaryDirectory(prefix="sdm-scratch-") as scratch:
            yield Path(scratch)
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        with signals_deferred():  # never stop between moving the old result away and moving the new one in
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                target.rename(old / "previous")
                staging.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
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
