"""sdm-sample, sdm-eval and sdm-calibrate as 2 CPU processes (gloo) under ``accelerate launch`` / ``torchrun``
give what one process gives: the same image files bit for bit, the same report numbers (Fréchet distances
to a relative 1e-5, see :func:`assert_same_numbers`), and calibrated weights within float tolerance of the
one-process run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import save_digit_sized_models
from spiking_diffusers import QCFSUNet2DModel
from spiking_diffusers.commands import calibrate, evaluate, sample

BIN = Path(sys.executable).parent
# CPU processes whatever the machine has, one thread each (as the in-process reference runs here).
pytestmark = pytest.mark.usefixtures("single_thread")

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(script: str, *args) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 processes; without GPUs its multi-process launcher runs them on CPU (gloo)."""
    command = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "--main_process_port", str(_free_port()), BIN / script, *args]  # fmt: skip
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, env=ENV, timeout=600, check=False)


def torchrun(script: str, *args) -> subprocess.CompletedProcess:
    command = [BIN / "torchrun", "--standalone", "--nproc_per_node", "2", BIN / script, *args]
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, env=ENV, timeout=600, check=False)


FD_TOLERANCE = 1e-5
"""Relative tolerance for Fréchet distances (and numbers derived from them) across process set-ups.

The images are bit-identical and the statistics are float64 in a fixed order, but the float32 digit
classifier that makes the features runs in another process, where MKL / oneDNN may pick kernels that add in
another order (on some CPUs; an AVX2-only EPYC gave 154.640625 vs 154.64060974 with the old float32 result).
That changes features in their last bits, which moves the distance by ~1e-8 relative
(tests/test_metrics.py::test_float32_rounding_of_features_moves_the_distance_far_less_than_the_tests_tolerance);
1e-5 leaves a factor of 100 while any changed image moves it by more than 1e-3."""


def assert_same_numbers(a, b, fd_keys: re.Pattern = re.compile(r"^(fd|frechet)")) -> None:
    """``a == b``, except that floats under a key matching ``fd_keys`` agree to :data:`FD_TOLERANCE` relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in a:
            if fd_keys.search(key) and b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=FD_TOLERANCE, abs=1e-9), key
            else:
                assert_same_numbers(a[key], b[key], fd_keys)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_numbers(x, y, fd_keys)
    else:
        assert a == b


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 1x16x16 ANN (the digit metric applies) and its spiking network."""
    return save_digit_sized_models(tmp_path_factory.mktemp("models"))


def test_sample_two_processes_write_the_images_of_one(models, tmp_path):
    args = ["--model", models["snn"], "--steps", "2", "-n", "5", "--batch-size", "2", "--threshold-scale", "0.9,1"]
    launched = accelerate_launch("sdm-sample", *args, "--output", tmp_path / "two")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("Wrote 10 images") == 1  # only the main process prints
    single = CliRunner().invoke(sample.main, [*map(str, args), "--output", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 2 * 6
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    sweeps = [json.loads((tmp_path / run / "sweep.json").read_text()) for run in ("one", "two")]
    assert_same_numbers(sweeps[0]["results"], sweeps[1]["results"])  # FD: to 1e-5, see FD_TOLERANCE
    assert sweeps[0]["best"] == sweeps[1]["best"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no staging or scratch left


def test_eval_two_processes_report_the_numbers_of_one(models, tmp_path):
    args = ["--model", models["ann"], "-T", "1,2", "--no-calibrate", "--num-images", "6", "--batch-size", "2",
            "--steps", "2", "--noise-timesteps", "2", "--noise-images", "4", "--grid-rows", "2", "--fd-splits", "2",
            "--no-progress", "--cache-dir", models["cache"]]  # fmt: skip
    launched = torchrun("sdm-eval", *args, "--output", tmp_path / "two")
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = CliRunner().invoke(evaluate.main, [*map(str, args), "--output", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    timing = ("sampling_seconds", "seconds_per_image")
    rows = [[{k: v for k, v in row.items() if k not in timing} for row in r["variants"]] for r in reports]
    assert_same_numbers(rows[0], rows[1])  # PSNR exactly (same images), FD and its ratios to 1e-5
    assert reports[0]["noise_timesteps"] == reports[1]["noise_timesteps"]


def test_calibrate_two_processes_follow_one_within_float_tolerance(models, tmp_path):
    """Each process takes half of every batch and the gradients are summed: the same updates as one process
    up to the order of float additions. Few steps: QCFS training amplifies rounding differences over a long
    run (as a different thread count does), see docs/scale-out.md."""
    args = ["--model", models["ann"], "-T", "2", "--num-samples", "16", "--sampler-steps", "2", "--distill-steps",
            "3", "--snn-steps", "2", "--batch-size", "8", "--snn-batch-size", "4", "--threshold-init", "percentile",
            "--block-loss-weight", "0.5", "--cache-dir", models["cache"], "--burst", "1",
            "--set-size", "256"]  # fmt: skip
    launched = accelerate_launch("sdm-calibrate", *args, "--output", tmp_path / "two")
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = CliRunner().invoke(calibrate.main, [*map(str, args), "--output", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    models_ = [QCFSUNet2DModel.from_pretrained(tmp_path / run / "unet") for run in ("one", "two")]
    one, two = (model.unet.state_dict() for model in models_)
    assert max((one[key] - two[key]).abs().max().item() for key in one) < 1e-4  # lr 1e-3: a tenth of a step
    # The output filter is a least-squares solve on those weights: its coefficients may move more, its output not.
    sample = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # the 1 x 16 x 16 model
    with torch.no_grad():
        outputs = [model(sample, torch.tensor([10, 900])).sample for model in models_]
    assert ((outputs[0] - outputs[1]).norm() / outputs[0].norm()).item() < 1e-2  # weights 1e-4 apart flip a floor
    reports = [json.loads((tmp_path / run / "calibration_report.json").read_text()) for run in ("one", "two")]
    for phase in ("distill", "snn"):
        assert reports[0]["loss_curves"][phase] == pytest.approx(reports[1]["loss_curves"][phase], rel=1e-5)
    # Each process fits the filter on its share of the inputs; the sums over processes see every input once.
    ranges = [report["output_filter"]["groups"] for report in reports]
    assert [g["inputs"] for g in ranges[0]] == [g["inputs"] for g in ranges[1]]
    assert sum(g["inputs"] for g in ranges[1]) == 256  # the whole set (under the fit's cap of 1024 inputs)
    errors = [[g["relative_error_after"] for g in r if g["inputs"]] for r in ranges]
    assert errors[0] == pytest.approx(errors[1], rel=0.05, abs=1e-3)
    assert not (tmp_path / ".two.checkpoint").exists()


def test_calibration_budget_gives_every_process_the_same_plan(models, tmp_path):
    """Under a budget each process would time the machine on its own and could scale the steps differently,
    then wait forever in a gradient all-reduce the other never reaches; they take the main process's timings."""
    args = ["--model", models["ann"], "-T", "2", "--num-samples", "16", "--sampler-steps", "2", "--distill-steps",
            "400", "--snn-steps", "40", "--batch-size", "8", "--snn-batch-size", "4", "--threshold-init", "percentile",
            "--cache-dir", models["cache"], "--calibration-budget", "0.05"]  # fmt: skip
    launched = accelerate_launch("sdm-calibrate", *args, "--output", tmp_path / "two")
    assert launched.returncode == 0, launched.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "calibration_report.json").read_text())
    requested, used = report["budget"]["changes"]["distill_steps"]
    assert requested == 400 and 0 < used < 400 and len(report["loss_curves"]["distill"]) == used
    assert launched.stderr.count("Budget 0.05 min:") == 1  # said once, by the main process
