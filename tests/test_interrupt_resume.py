"""Interrupted runs: the output path keeps its previous content, no staging directory is left behind, and an
interrupted calibration resumed from its checkpoint ends with the weights of a run never stopped, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import QCFSUNet2DModel
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate
from spiking_diffusers.calibration.checkpoint import CHECKPOINT_FILE, CalibrationCheckpoints, checkpoint_dir
from spiking_diffusers.calibration.data import CalibrationSet
from spiking_diffusers.calibration.distill import DistillSettings
from spiking_diffusers.cli import OUTPUT_MARKER
from spiking_diffusers.commands import calibrate as calibrate_cmd
from spiking_diffusers.errors import DamagedFileError, InputError

SCHEDULER_CONFIG = dict(DDPMScheduler(num_train_timesteps=1000).config)
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("single_thread")

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def config(tmp_path: Path, **overrides) -> CalibrationConfig:
    settings = dict(
        timesteps=2,
        num_samples=8,
        sampler_steps=2,
        stats_batches=1,
        set_size=64,
        threshold_init="percentile",
        distill=DistillSettings(steps=6, batch_size=4, block_loss_weight=0.5),
        snn=DistillSettings(steps=4, batch_size=4, lr=1e-4),
        cache_dir=str(tmp_path / "cache"),
    )
    settings.update(overrides)
    return CalibrationConfig(**settings)


@pytest.fixture(scope="module")
def unet():
    return make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)


def interrupt_at_draw(monkeypatch, count: int) -> None:
    """Raise KeyboardInterrupt on the ``count``-th training batch drawn from the calibration set (one per step
    of distillation, then of SNN fine-tuning)."""
    original, calls = CalibrationSet.sample, []

    def sample(self, batch_size):
        calls.append(batch_size)
        if len(calls) == count:
            raise KeyboardInterrupt
        return original(self, batch_size)

    monkeypatch.setattr(CalibrationSet, "sample", sample)


def assert_same_result(a, b) -> None:
    state_a, state_b = a.qnet.state_dict(), b.qnet.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    assert a.report["loss_curves"] == b.report["loss_curves"]
    assert a.report["sites"] == b.report["sites"]


@pytest.mark.parametrize(
    ("draw", "resumes_from"),
    [(4, ("distill", 2)), (8, ("distill", 6)), (9, ("snn", 2))],
    ids=["mid-distillation", "snn-phase-before-its-first-checkpoint", "mid-snn-fine-tuning"],
)
def test_resumed_calibration_equals_an_uninterrupted_run(unet, tmp_path, monkeypatch, draw, resumes_from):
    reference = calibrate(unet, SCHEDULER_CONFIG, config(tmp_path), progress=False)

    directory = tmp_path / "checkpoint"
    with monkeypatch.context() as patch:
        interrupt_at_draw(patch, draw)
        with pytest.raises(KeyboardInterrupt):
            calibrate(unet, SCHEDULER_CONFIG, config(tmp_path), False, CalibrationCheckpoints(directory, every=2))
    saved = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    assert (saved["phase"], saved["step"]) == resumes_from

    checkpoints = CalibrationCheckpoints(directory, every=2, resume=True)
    resumed = calibrate(unet, SCHEDULER_CONFIG, config(tmp_path), False, checkpoints)
    assert_same_result(resumed, reference)


def test_resume_refuses_a_checkpoint_of_other_settings_or_a_damaged_one(unet, tmp_path, monkeypatch):
    directory = tmp_path / "checkpoint"
    with monkeypatch.context() as patch:
        interrupt_at_draw(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            calibrate(unet, SCHEDULER_CONFIG, config(tmp_path), False, CalibrationCheckpoints(directory, every=2))
    other = config(tmp_path, seed=1, distill=DistillSettings(steps=6, batch_size=4, lr=1e-2))
    with pytest.raises(InputError, match="another setting distill, setting seed"):
        calibrate(unet, SCHEDULER_CONFIG, other, False, CalibrationCheckpoints(directory, every=2, resume=True))
    (directory / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedFileError, match="leave out --resume"):
        calibrate(unet, SCHEDULER_CONFIG, config(tmp_path), False, CalibrationCheckpoints(directory, resume=True))
    fresh = calibrate(unet, SCHEDULER_CONFIG, config(tmp_path), False, CalibrationCheckpoints(directory, every=2))
    assert len(fresh.report["loss_curves"]["distill"]) == 6  # without --resume: starts over


@pytest.fixture(scope="module")
def ann_dir(unet, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ann")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def _previous_result(out: Path, command: str) -> None:
    """A previous output of ``command``, which --overwrite may replace (but an interrupted run must not)."""
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    (out / OUTPUT_MARKER).write_text(json.dumps({"command": command}))


def _default_sigint() -> None:
    """Give the child the default SIGINT action: a shell runs background jobs (``make test &``) with SIGINT
    ignored, the children inherit that, and Python then never turns SIGINT into a ``KeyboardInterrupt``."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_when(process: subprocess.Popen, ready, sig: int, timeout: float = 120.0) -> tuple[int, str]:
    """Send ``sig`` to ``process`` once ``ready()`` holds; return its exit code and stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def _assert_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "keep.txt"])
    assert not list(out.parent.glob(f".{out.name}.tmp-*")) and not list(out.parent.glob(f".{out.name}.old-*"))


def test_sigterm_mid_calibration_keeps_the_output_and_resume_finishes_it(ann_dir, tmp_path):
    """A real process stopped by SIGTERM right after its first checkpoint; then --resume in-process."""
    cache = tmp_path / "cache"
    args = ["--model", ann_dir, "-T", "2", "--num-samples", "8", "--sampler-steps", "2", "--distill-steps", "60",
            "--snn-steps", "3", "--batch-size", "4", "--snn-batch-size", "4", "--threshold-init", "percentile",
            "--cache-dir", cache, "--checkpoint-every", "5", "--set-size", "64", "--overwrite"]  # fmt: skip
    out = tmp_path / "out"
    _previous_result(out, "sdm-calibrate")
    checkpoint = checkpoint_dir(out) / CHECKPOINT_FILE
    process = subprocess.Popen(
        [BIN / "sdm-calibrate", *map(str, args), "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    code, stderr = _stop_when(process, checkpoint.is_file, signal.SIGTERM)
    assert code == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: Interrupted; no partial output was written. Add --resume to the same command")
    assert "Traceback" not in stderr
    _assert_untouched(out)
    steps_done = torch.load(checkpoint, weights_only=True)["step"]
    assert 5 <= steps_done < 60

    runner = CliRunner()
    resumed = runner.invoke(calibrate_cmd.main, [*map(str, args), "--output", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert not checkpoint_dir(out).exists()  # removed once the output is complete
    reference = runner.invoke(calibrate_cmd.main, [*map(str, args), "--output", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    a = QCFSUNet2DModel.from_pretrained(out / "unet").state_dict()
    b = QCFSUNet2DModel.from_pretrained(tmp_path / "reference" / "unet").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    curves = [
        json.loads((d / "calibration_report.json").read_text())["loss_curves"] for d in (out, tmp_path / "reference")
    ]
    assert curves[0] == curves[1] and len(curves[0]["distill"]) == 60


def test_sigint_mid_conversion_keeps_the_previous_output(ann_dir, tmp_path):
    """A real sdm-convert stopped by SIGINT while it calibrates (once its calibration images are cached)."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    _previous_result(out, "sdm-convert")
    process = subprocess.Popen(
        [BIN / "sdm-convert", "--model", str(ann_dir), "-T", "2", "--calibration-samples", "8",
         "--calibration-steps", "5000", "--output", str(out), "--overwrite"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(ENV, SDM_CACHE_DIR=str(cache)),
        preexec_fn=_default_sigint,
    )  # fmt: skip
    code, stderr = _stop_when(process, lambda: any(cache.glob("calibration/*.safetensors")), signal.SIGINT)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "Error: Interrupted; no partial output was written."
    _assert_untouched(out)


ROOT = Path(__file__).resolve().parents[1]
LAUNCHED = """
import sys
import {module} as launcher

real_import = launcher._import_command


def announced(name):  # the signal comes while torch and diffusers are being imported
    sys.stderr.write("importing\\n")
    sys.stderr.flush()
    return real_import(name)


launcher._import_command = announced
sys.argv[0] = {script!r}
sys.exit(launcher.{function}())
"""


def console_scripts() -> dict[str, tuple[str, str]]:
    """``[project.scripts]`` of pyproject.toml: script -> (module, function)."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: tuple(target.split(":")) for name, target in scripts.items()}


def test_every_console_script_goes_through_the_launcher_to_its_own_command(monkeypatch):
    import importlib

    scripts = console_scripts()
    assert len(scripts) == 6
    for script, (module, function) in scripts.items():
        assert module == "spiking_diffusers_launcher", script
        launcher = importlib.import_module(module)
        monkeypatch.setattr(launcher, "_run", lambda name: name)
        command = getattr(launcher, function)()
        assert importlib.import_module(f"spiking_diffusers.commands.{command}").main.name == script


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_exits_130_with_one_error_line(tmp_path, sig):
    """Before the launcher, Ctrl-C while importing printed a KeyboardInterrupt traceback and SIGTERM exited 143."""
    module, function = console_scripts()["sdm-sample"]
    code = LAUNCHED.format(module=module, function=function, script="sdm-sample")
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--output", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_sigint,
    )  # fmt: skip
    assert process.stderr.readline() == "importing\n"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines() == ["Error: Interrupted; no partial output was written."]
    assert not (tmp_path / "out").exists()


def test_a_signal_while_the_command_line_is_parsed_exits_130(monkeypatch):
    """click alone would print "Aborted!" and exit 1."""

    def interrupted(self, ctx, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_cmd.main.__class__, "parse_args", interrupted)
    result = CliRunner().invoke(calibrate_cmd.main, ["--output", "anywhere"])
    assert result.exit_code == 130 and result.output.strip() == "Error: Interrupted; no partial output was written."
