"""The expected failures of the toolkit: each carries a one-line message that says what to do, and the
exit code the ``sdm-*`` commands report it with (2: usage mistake, 1: runtime failure).

Library code raises them where a user's input is at fault (a wrong argument, a damaged file, a model
that computes NaN), so the command line can print the message alone instead of a traceback.
"""

from __future__ import annotations

import torch


class SdmError(Exception):
    """An expected failure; ``exit_code`` is 1 (runtime) unless the subclass or the caller says otherwise."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(SdmError, ValueError):
    """An argument that cannot work: wrong kind of file, no images, a shape the model cannot take (exit 2)."""

    exit_code = 2


class DamagedFileError(SdmError, OSError):
    """A file of the right kind whose content cannot be read (exit 1)."""


class NonFiniteError(SdmError, ArithmeticError):
    """A model produced NaN or Inf where finite values are needed (exit 1)."""


def check_finite(tensor: torch.Tensor, what: str, hint: str) -> None:
    """Raise :class:`NonFiniteError` ("``what`` is not finite (N NaN, M Inf values); ``hint``") unless every
    value of ``tensor`` is finite."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    raise NonFiniteError(f"{what} is not finite ({nan} NaN, {int((~finite).sum()) - nan} Inf values); {hint}")
