"""The entry points of the ``sdm-*`` console scripts: Ctrl-C and SIGTERM are handled from the first moment.

Importing torch and diffusers takes seconds. A SIGINT in that time used to end in a long ``KeyboardInterrupt``
traceback, and a SIGTERM killed the process with exit code 143 instead of the documented 130. This module
imports nothing but the standard library: it installs the handlers, then imports the command. A signal before
the command runs ends the process with exit code 130 and one ``Error:`` line; once the command runs, its own
handling takes over (the output keeps its previous content, see ``spiking_diffusers.cli``).

It is a package of its own because importing anything inside ``spiking_diffusers`` first imports the
package's ``__init__``, which imports torch.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Callable

INTERRUPTED = "Interrupted; no partial output was written."
"""The message of a command stopped by SIGINT or SIGTERM (after ``Error: ``)."""

EXIT_INTERRUPTED = 130
"""The exit code of a command stopped by SIGINT or SIGTERM, whenever the signal comes."""


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Turn SIGINT and SIGTERM into ``KeyboardInterrupt`` (main thread only). A signal the process was
    started with ignored (``nohup``, a background job of a non-interactive shell) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_keyboard_interrupt)


def _import_command(name: str) -> Callable:
    return importlib.import_module(f"spiking_diffusers.commands.{name}").main


def _run(name: str):
    install_signal_handlers()
    try:
        main = _import_command(name)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nError: {INTERRUPTED}\n")
        sys.exit(EXIT_INTERRUPTED)
    return main()


def convert():
    """``sdm-convert``."""
    return _run("convert")


def calibrate():
    """``sdm-calibrate``."""
    return _run("calibrate")


def sample():
    """``sdm-sample``."""
    return _run("sample")


def evaluate():
    """``sdm-eval``."""
    return _run("evaluate")


def energy():
    """``sdm-energy``."""
    return _run("energy")


def export():
    """``sdm-export``."""
    return _run("export")
