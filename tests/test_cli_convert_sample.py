"""sdm-convert and sdm-sample end to end on a tiny model in both layouts, in-process and as console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from PIL import Image

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import SpikingDiffusionPipeline, SpikingUNet2DModel, quantize
from spiking_diffusers import convert as convert_model
from spiking_diffusers.cli import OUTPUT_MARKER
from spiking_diffusers.commands import convert, sample
from spiking_diffusers.pipelines import SCHEDULERS, make_scheduler

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny ANN in the google/ddpm-* layout and as a saved pipeline, and its QCFS network."""
    root = tmp_path_factory.mktemp("models")
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    unet.save_pretrained(root / "google")
    scheduler.save_pretrained(root / "google")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "pipeline")
    quantize(unet, levels=3).save_pretrained(root / "qcfs")
    return {"google": root / "google", "pipeline": root / "pipeline", "qcfs": root / "qcfs"}


def invoke(command, *args: str):
    return CliRunner().invoke(command.main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def snn_dir(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "snn"
    result = invoke(
        convert, "--model", models["google"], "--timesteps", 2, "--output", out, "--device", "cpu",
        "--calibration-samples", 8, "--calibration-steps", 3, "--snn-steps", 2, "--calibration-set-size", 64,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "calibrated here" in result.output
    return out


def test_convert_google_layout_writes_a_loadable_spiking_pipeline(snn_dir):
    pipe = DiffusionPipeline.from_pretrained(snn_dir)
    assert type(pipe) is SpikingDiffusionPipeline
    assert type(pipe.scheduler) is DDPMScheduler and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    unet = SpikingUNet2DModel.from_pretrained(snn_dir, subfolder="unet")
    config = unet.config  # default: burst B = 4, L = BT, residual spikes, delta spikes
    assert (config.timesteps, config.levels, config.burst, config.residual_spikes) == (2, 8, 4, True)
    assert config.delta_spikes is True
    report = json.loads((snn_dir / "conversion.json").read_text())
    calibration = json.loads((snn_dir / "calibration_report.json").read_text())
    assert len(calibration["loss_curves"]["distill"]) == 3 and (snn_dir / "calibration.png").is_file()
    assert calibration["settings"]["set_size"] == 64  # --calibration-set-size reaches the recipe
    assert sum(report["summary"]["sites"].values()) == len(unet.sites())
    assert report["summary"]["sites"]["time-embedding IF"] > 0
    # residual spikes split each attention at its projections: its GroupNorm and its core are compensated apart
    assert report["summary"]["nonlinear_ops"] == {"AttentionCore": 4, "GroupNorm": 21}
    assert [row["t"] for row in report["fidelity"]] == [50, 250, 500, 750, 950]
    assert all(np.isfinite(row["snn_vs_ann"]) for row in report["fidelity"])


def test_convert_pipeline_layout_with_options_prints_the_summary(models, tmp_path):
    out = tmp_path / "snn"
    result = invoke(
        convert, "--model", models["pipeline"], "-T", 3, "-L", 5, "--neuron", "signed_if",
        "--threshold-form", "unit", "--per-channel", "--nonlinear-mode", "per_step", "--no-calibrate", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for line in ("Sites: 26 (17 spatial IF, 9 time-embedding IF, 0 analog QCFS)", "per channel", "4 Attention"):
        assert line in result.output
    assert "Fidelity" in result.output and "  950  " in result.output
    config = SpikingUNet2DModel.from_pretrained(out / "unet").config
    assert (config.timesteps, config.levels, config.neuron, config.threshold_form) == (3, 5, "signed_if", "unit")
    assert config.per_channel and config.nonlinear_mode == "per_step"


def test_convert_with_burst_neurons_quantizes_an_ann_at_b_times_t_levels(models, tmp_path):
    out = tmp_path / "snn"
    result = invoke(
        convert, "--model", models["pipeline"], "-T", 2, "--burst", 3, "--no-calibrate", "--no-delta-spikes",
        "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = SpikingUNet2DModel.from_pretrained(out / "unet").config
    assert (config.timesteps, config.levels, config.burst, config.delta_spikes) == (2, 6, 3, False)
    assert json.loads((out / "conversion.json").read_text())["settings"]["delta_spikes"] is False
    signed = invoke(
        convert, "--model", models["pipeline"], "--burst", 2, "--neuron", "signed_if", "--output", tmp_path / "x"
    )
    assert signed.exit_code == 2 and "--burst needs --neuron if" in signed.output


def test_convert_takes_a_qcfs_model_as_it_is_and_a_spiking_one_through_its_qcfs_network(models, snn_dir, tmp_path):
    result = invoke(convert, "--model", models["qcfs"], "--output", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "Converted a QCFS model with L = 3" in result.output
    assert "vs the QCFS weights with the original activations" in result.output
    result = invoke(convert, "--model", models["qcfs"], "--reference", models["google"], "--output", tmp_path / "r")
    assert result.exit_code == 0 and "noise prediction vs the ANN" in result.output, result.output
    result = invoke(convert, "--model", models["qcfs"], "--reference", snn_dir, "--output", tmp_path / "s")
    assert result.exit_code == 2 and "is not the original UNet2DModel" in result.output
    result = invoke(convert, "--model", models["qcfs"], "--levels", 4, "--output", tmp_path / "b")
    assert result.exit_code == 2 and "levels=4 conflicts with the model's own levels=3" in result.output
    assert not any((tmp_path / name).exists() for name in "bs")
    result = invoke(convert, "--model", snn_dir, "-T", "4", "--output", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "Converted a spiking model (its QCFS network)" in result.output
    assert SpikingUNet2DModel.from_pretrained(tmp_path / "c" / "unet").config.timesteps == 4


def test_sample_sweep_uses_the_same_noise_at_every_scale(snn_dir, tmp_path):
    out = tmp_path / "sweep"
    result = invoke(
        sample, "--model", snn_dir, "--steps", 2, "-n", 3, "--batch-size", 2,
        "--threshold-scale", "0.9,0.99", "--threshold-scale", "down=0.95,up=1.05", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    labels = [row["label"] for row in sweep["results"]]
    assert labels == ["1", "0.9", "0.99", "down=0.95,up=1.05"] and sweep["reference"] == "1"
    for row in sweep["results"]:
        assert sorted(p.name for p in (out / row["dir"]).iterdir()) == [
            "00000.png",
            "00001.png",
            "00002.png",
            "grid.png",
        ]
        assert (row["psnr_vs_scale_1_db"] is None) == (row["label"] == "1")
    assert "PSNR vs scale 1" in result.output and "Best threshold scale" in result.output

    plain = tmp_path / "plain"  # one batch of 3 instead of 2 + 1: image i depends on seed + i only
    assert invoke(sample, "--model", snn_dir, "--steps", 2, "-n", 3, "--output", plain).exit_code == 0
    for name in ("00000.png", "00002.png"):
        a, b = (np.asarray(Image.open(d / name), dtype=int) for d in (plain, out / "scale-1"))
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("name", SCHEDULERS)
def test_sample_every_scheduler_on_the_ann(models, tmp_path, name):
    out = tmp_path / name
    result = invoke(sample, "--model", models["google"], "--scheduler", name, "--steps", 2, "-n", 2, "--output", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "grid.png").size == (176, 96)  # 2 x 1 tiles of 8 px with 2 px gaps, enlarged 8 times
    assert make_scheduler(name, DDPMScheduler(beta_schedule="squaredcos_cap_v2").config).config.beta_schedule == (
        "squaredcos_cap_v2"
    )


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (convert, ["--model", "{tmp}/missing"], "No such directory"),
        (
            convert,
            ["--model", "{google}", "--timesteps", "0"],
            "'--spike-steps' / '--timesteps' / '-T': 0 is not in the range 1<=x<=1024",
        ),
        (convert, ["--model", "{root}"], "is not a diffusers model"),
        (sample, ["--model", "{snn}", "--threshold-scale", "-1"], "every value must be a finite number > 0"),
        (sample, ["--model", "{snn}", "--threshold-scale", "left=0.9"], "Unknown threshold_scale group"),
        (sample, ["--model", "{google}", "--threshold-scale", "0.99"], "apply to spiking models"),
        (sample, ["--model", "{snn}", "--scheduler", "euler", "--eta", "0.5"], "--eta applies to the ddim"),
        (sample, ["--model", "{google}", "--steps", "0"], "'--steps': 0 is not in the range"),
    ],
)
def test_usage_mistakes_exit_2_with_one_error_line_and_leave_nothing(models, snn_dir, tmp_path, command, args, message):
    out = tmp_path / "out"
    paths = {"tmp": tmp_path, "root": models["google"].parent, "google": models["google"], "snn": snn_dir}
    result = invoke(command, *[arg.format(**paths) for arg in args], "--output", out)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_runtime_failure_exits_1_and_keeps_the_previous_output(models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((models["google"] / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    (out / OUTPUT_MARKER).write_text(json.dumps({"command": "sdm-convert"}))  # a previous sdm-convert output
    result = invoke(convert, "--model", broken, "--output", out, "--overwrite")
    assert result.exit_code == 1 and result.output.startswith("Error: Could not load the weights")
    assert (out / "keep.txt").read_text() == "previous result" and not list(tmp_path.glob(".out.*"))
    result = invoke(convert, "--model", models["google"], "--output", out)
    assert result.exit_code == 2 and "pass --overwrite" in result.output


def test_help_shows_examples():
    for command in (convert, sample):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.output and "--device" in result.output


def test_console_scripts_run_as_subprocesses(models, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    snn = tmp_path / "snn"
    run = subprocess.run(
        [BIN / "sdm-convert", "--model", models["pipeline"], "-T", "2", "--no-calibrate", "--output", snn],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Fidelity" in run.stdout
    run = subprocess.run(
        [BIN / "sdm-sample", "--model", snn, "--steps", "2", "-n", "2", "--threshold-scale", "0.9,1", "--output",
         tmp_path / "samples"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "samples" / "scale-0.9" / "grid.png").is_file()


def test_sweep_on_digit_shaped_images_ranks_scales_by_frechet_distance(tmp_path, monkeypatch):
    monkeypatch.setenv("SDM_CACHE_DIR", str(tmp_path / "cache"))
    unet = make_unet(dict(TINY_CONFIGS["attention"], sample_size=16), dtype=torch.float32)
    pipe = SpikingDiffusionPipeline(
        unet=convert_model(quantize(unet, levels=2), timesteps=2), scheduler=DDPMScheduler()
    )
    pipe.save_pretrained(tmp_path / "snn")
    out = tmp_path / "sweep"
    result = invoke(
        sample, "--model", tmp_path / "snn", "--steps", 2, "-n", 4, "--threshold-scale", "0.9,1", "--output", out
    )
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    distances = {row["label"]: row["frechet_distance"] for row in sweep["results"]}
    assert all(np.isfinite(d) and d > 0 for d in distances.values())
    assert sweep["best"] == min(distances, key=distances.get) and "Best threshold scale (lowest" in result.output
