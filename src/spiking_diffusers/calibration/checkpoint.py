"""Checkpoints of a calibration run, so that an interrupted ``sdm-calibrate`` continues with ``--resume``
and ends with the weights an uninterrupted run would have given, bit for bit.

Where: a hidden directory beside the output, ``.<output name>.checkpoint/`` (:func:`checkpoint_dir`): on
the output's file system, found again from the same ``--output``, created with the first checkpoint and
removed once the output is complete. A run without ``--resume`` starts over and discards it.

What: ``checkpoint.pt`` holds the latest state, written atomically (temporary file, then rename) every
``every`` steps of each phase and after its last step: the phase (``distill`` or ``snn``) and its steps
done, the student's weights, the AdamW state, the state of the calibration data's generator and of torch's
global generator, the loss history of the phase and of the finished one, and the elapsed time (see
:class:`~spiking_diffusers.calibration.distill.DistillState`), and the sizes a time budget chose (a resumed
run keeps them rather than timing the machine again). The learning-rate schedule is a function of
the step. ``settings.json`` holds the run's fingerprint (a hash of the model's config and weights, the
noise schedule, every calibration setting): a checkpoint is resumed only by a run with the same one.

Everything before the first phase (calibration images, threshold initialisation) is deterministic and
recomputed on resume; the calibration images come from their cache. With several processes only the main
one writes; every process reads the same checkpoint when it resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..errors import DamagedFileError, InputError
from .distill import DistillHistory, DistillState

CHECKPOINT_FILE = "checkpoint.pt"
FINGERPRINT_FILE = "settings.json"


def checkpoint_dir(output: str | os.PathLike) -> Path:
    """The checkpoint directory of a calibration writing to ``output``."""
    target = Path(output).expanduser().resolve()
    return target.parent / f".{target.name}.checkpoint"


@dataclass
class SavedCalibration:
    """A checkpoint as read back: the phase it was in, that phase's state, and the finished phases' histories."""

    phase: str
    state: DistillState
    finished: dict[str, DistillHistory]
    plan: dict[str, list[int]] | None = None
    """The sizes a budget scaled (setting -> ``[requested, used]``), or ``None`` without a budget."""


class CalibrationCheckpoints:
    """The checkpoints of one calibration run in ``directory``, one every ``every`` steps (0: only at the
    end of each phase); with ``resume`` the run continues from the one found there."""

    def __init__(self, directory: str | os.PathLike, every: int = 100, resume: bool = False):
        self.directory = Path(directory)
        self.every = int(every)
        self.resume = resume
        self.plan: dict[str, list[int]] | None = None
        """What a budget scaled in this run (saved with every checkpoint)."""
        self._fingerprint: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        """The checkpoint file (``checkpoint.pt`` in the directory)."""
        return self.directory / CHECKPOINT_FILE

    def exists(self) -> bool:
        """Whether a checkpoint has been written."""
        return self.path.is_file()

    def start(self, fingerprint: dict[str, Any]) -> SavedCalibration | None:
        """Begin a run with ``fingerprint`` (JSON-able): the checkpoint to continue from (with ``resume``,
        when there is one), or ``None`` after clearing the directory for a fresh run."""
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self._fingerprint = fingerprint
        if self.resume and self.exists():
            try:
                saved = json.loads((self.directory / FINGERPRINT_FILE).read_text())
            except (OSError, ValueError) as err:
                raise self._damaged(err) from err
            differing = _differences(saved, fingerprint)
            if differing:
                raise InputError(
                    f"The checkpoint in {self.directory} is of a run with another {', '.join(differing)}; resume "
                    "with the same model and settings, or leave out --resume to start over."
                )
            return self._load()
        if distributed.is_main_process():
            self.clear()
        return None

    def phase(self, name: str, finished: dict[str, DistillHistory]) -> _PhaseCheckpoint:
        """The :class:`~spiking_diffusers.calibration.distill.PhaseCheckpoint` of phase ``name``."""
        return _PhaseCheckpoint(self, name, finished)

    def save(self, phase: str, state: DistillState, finished: dict[str, DistillHistory]) -> None:
        """Write the checkpoint atomically (main process only)."""
        if not distributed.is_main_process():
            return
        payload = {
            "phase": phase,
            "step": state.step,
            "student": state.student,
            "optimizer": state.optimizer,
            "generator": state.generator,
            "rng": state.rng,
            "history": asdict(state.history),
            "finished": {name: asdict(history) for name, history in finished.items()},
            "plan": self.plan,
        }
        if not self.directory.is_dir():  # created with the first checkpoint: a run that fails before leaves none
            self.directory.mkdir(parents=True)
            (self.directory / FINGERPRINT_FILE).write_text(json.dumps(self._fingerprint, indent=2) + "\n")
        staging = self.path.with_name(f"{CHECKPOINT_FILE}.tmp-{os.getpid()}")
        try:
            torch.save(payload, staging)
            staging.replace(self.path)
        finally:
            staging.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the directory (the run is complete, or starts over)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _damaged(self, err: Exception) -> DamagedFileError:
        return DamagedFileError(
            f"The checkpoint in {self.directory} cannot be read ({err}); leave out --resume to start over."
        )

    def _load(self) -> SavedCalibration:
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: torch raises several kinds
            raise self._damaged(err) from err
        state = DistillState(
            payload["step"],
            payload["student"],
            payload["optimizer"],
            payload["generator"],
            payload["rng"],
            DistillHistory(**payload["history"]),
        )
        finished = {name: DistillHistory(**history) for name, history in payload["finished"].items()}
        return SavedCalibration(payload["phase"], state, finished, payload.get("plan"))


class _PhaseCheckpoint:
    def __init__(self, owner: CalibrationCheckpoints, phase: str, finished: dict[str, DistillHistory]):
        self.owner, self.phase, self.finished = owner, phase, finished

    def due(self, steps_done: int) -> bool:
        return self.owner.every > 0 and steps_done % self.owner.every == 0

    def save(self, state: DistillState) -> None:
        self.owner.save(self.phase, state, self.finished)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints: ``model``, ``noise_schedule``, and the names of settings."""
    differing = [key for key in ("model", "noise_schedule") if saved.get(key) != current.get(key)]
    before, now = saved.get("settings", {}), current.get("settings", {})
    return differing + sorted(f"setting {key}" for key in set(before) | set(now) if before.get(key) != now.get(key))
