"""The same seed gives the same outputs on CPU, bit for bit, for every command: each runs twice on a tiny
model and every file it writes is compared (weights and arrays exactly, images decoded, JSON reports
without their timings, Fréchet distances included).

Both runs share the process, the machine and the thread count, so every reduction adds in the same order and
exact equality is the right test. Across thread counts, processes or machines only the images (and weights
at the same thread count) stay bit-identical; metrics agree to a tolerance (tests/test_scale_out.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from conftest import save_digit_sized_models
from spiking_diffusers.commands import calibrate, energy, evaluate, export, sample
from spiking_diffusers.commands import convert as convert_cmd

TIMING = re.compile(r"seconds|wall_time")

RUNS = {
    "convert": (convert_cmd, ["--model", "{ann}", "-T", "2", "--calibration-samples", "8", "--calibration-steps", "3",
                              "--calibration-set-size", "64",
                              "--snn-steps", "2", "--seed", "3"]),
    "calibrate": (calibrate, ["--model", "{ann}", "-T", "2", "--num-samples", "8", "--sampler-steps", "2",
                              "--distill-steps", "3", "--snn-steps", "2", "--batch-size", "4", "--snn-batch-size", "4",
                              "--set-size", "64",
                              "--seed", "3", "--cache-dir", "{cache}"]),
    "sample": (sample, ["--model", "{snn}", "--scheduler", "ddpm", "--steps", "3", "-n", "3", "--batch-size", "2",
                        "--threshold-scale", "0.95,1", "--seed", "3"]),
    "eval": (evaluate, ["--model", "{ann}", "-T", "2", "--num-images", "4", "--batch-size", "4", "--steps", "2",
                        "--scheduler", "euler-a", "--noise-timesteps", "2", "--noise-images", "2", "--grid-rows", "2",
                        "--calibration-samples", "4", "--calibration-steps", "2", "--snn-steps", "1", "--seed", "3",
                        "--calibration-set-size", "64",
                        "--no-progress", "--cache-dir", "{cache}"]),
    "energy": (energy, ["--model", "{ann}", "-T", "2", "--steps", "2", "--num-images", "2", "--seed", "3",
                        "--no-calibrate"]),
    "export": (export, ["--model", "{ann}", "-T", "2", "--seed", "3", "--no-calibrate"]),
}  # fmt: skip
"""Each command with small settings and stochastic parts switched on (DDPM and Euler-ancestral samplers,
calibration inside sdm-convert and sdm-eval)."""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    return save_digit_sized_models(tmp_path_factory.mktemp("models"))


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def assert_same_file(a: Path, b: Path) -> None:
    if a.suffix == ".json":
        assert _without_timings(json.loads(a.read_text())) == _without_timings(json.loads(b.read_text())), a.name
    elif a.suffix == ".png":
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
    elif a.suffix == ".safetensors":
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a.name
    elif a.suffix == ".npz":
        x, y = np.load(a), np.load(b)
        assert sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files), a.name
    elif a.name == "report.md":  # the markdown of report.json, whose last column is seconds per image
        strip = re.compile(r"\| [0-9.]+ \|$", re.MULTILINE)
        assert strip.sub("|", a.read_text()) == strip.sub("|", b.read_text())
    else:
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_gives_identical_outputs(paths, tmp_path, name):
    command, template = RUNS[name]
    args = [arg.format(**{k: str(v) for k, v in paths.items()}) for arg in template]
    for run in ("a", "b"):
        result = CliRunner().invoke(command.main, [*args, "--output", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files
    for file in files:
        assert_same_file(tmp_path / "a" / file, tmp_path / "b" / file)
