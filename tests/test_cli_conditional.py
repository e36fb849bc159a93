"""The commands on conditional UNets: a label-conditional pipeline (sdm-convert calibrates it with its label
tokens, sdm-sample draws labels with classifier-free guidance, sdm-eval reports the conditional accuracy) and a
Stable Diffusion pipeline directory (sdm-convert converts the UNet, copies the rest, and the result loads with
``DiffusionPipeline.from_pretrained``)."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from PIL import Image

from conftest import CROSS, TINY_CONFIGS, make_conditional, make_unet, tiny_text_encoder, tiny_vae
from spiking_diffusers import LabelTokens, SpikingDiffusionPipeline, SpikingUNet2DConditionModel
from spiking_diffusers.commands import convert, evaluate, sample
from spiking_diffusers.digits import load_digit_dataset
from spiking_diffusers.metrics import ConditionalAccuracy
from spiking_diffusers.pipelines import make_scheduler

FAST_CALIBRATION = ["--calibration-samples", 10, "--calibration-steps", 2, "--snn-steps", 1]
FAST_CALIBRATION += ["--calibration-set-size", 64]


def invoke(command, *args):
    return CliRunner().invoke(command.main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def label_pipeline(tmp_path_factory) -> Path:
    """A tiny label-conditional pipeline shaped like the digits (1x16x16, 10 classes): the digit classifier
    can judge its samples."""
    root = tmp_path_factory.mktemp("conditional") / "labels"
    unet = make_conditional(dtype=torch.float32, in_channels=1, out_channels=1, sample_size=16)
    torch.manual_seed(1)
    tokens = LabelTokens(num_classes=10, dim=CROSS)
    SpikingDiffusionPipeline(unet=unet, scheduler=DDPMScheduler(), label_tokens=tokens).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def label_snn(label_pipeline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "snn"
    result = invoke(convert, "--model", label_pipeline, "-T", 2, "--output", out, *FAST_CALIBRATION)
    assert result.exit_code == 0, result.output
    return out


def test_convert_calibrates_a_label_conditional_pipeline_and_keeps_its_tokens(label_pipeline, label_snn):
    pipe = DiffusionPipeline.from_pretrained(label_snn)
    assert type(pipe) is SpikingDiffusionPipeline and isinstance(pipe.unet, SpikingUNet2DConditionModel)
    original = LabelTokens.from_pretrained(label_pipeline / "label_tokens")
    assert torch.equal(pipe.label_tokens.embedding.weight, original.embedding.weight)
    report = json.loads((label_snn / "conversion.json").read_text())
    assert report["calibrated_here"] and (label_snn / "calibration_report.json").is_file()
    assert report["summary"]["nonlinear_ops"]["LayerNorm"] > 0 and report["summary"]["nonlinear_ops"]["GateProduct"] > 0
    assert all(np.isfinite(row["snn_vs_ann"]) for row in report["fidelity"])


def test_sample_draws_the_requested_labels_with_guidance(label_snn, tmp_path):
    out = tmp_path / "samples"
    result = invoke(
        sample, "--model", label_snn, "-n", 4, "--steps", 2, "--class-labels", "3,7", "--guidance-scale", 2,
        "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "labels 3,7 in turn, guidance 2" in result.output
    saved = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(4)])
    pipe = DiffusionPipeline.from_pretrained(label_snn)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=4, generator=[torch.Generator().manual_seed(i) for i in range(4)], num_inference_steps=2,
        output_type="np", class_labels=torch.tensor([3, 7, 3, 7]), guidance_scale=2.0,
    ).images  # fmt: skip
    np.testing.assert_array_equal(saved, (expected[..., 0] * 255).round().astype(np.uint8))


def test_conditioning_mistakes_are_usage_errors_that_write_nothing(label_snn, tmp_path):
    unconditional = tmp_path / "ann"
    make_unet(TINY_CONFIGS["attention"], dtype=torch.float32).save_pretrained(unconditional)
    cases = [
        (["--model", label_snn, "--class-labels", "3,10"], "expected labels in 0..9"),
        (["--model", label_snn, "--class-labels", "three"], "comma-separated integers"),
        (["--model", label_snn, "--guidance-scale", "-1"], "--guidance-scale"),
        (["--model", unconditional, "--guidance-scale", "2"], "needs a label-conditional model"),
        (["--model", unconditional, "--class-labels", "1"], "takes no class labels"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        result = invoke(sample, *args, "-n", 1, "--steps", 1, "--output", out)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists()


def test_conditional_accuracy_scores_real_digits_by_their_labels():
    images, labels = load_digit_dataset(16, "test")
    judge = ConditionalAccuracy()
    assert judge.applies((1, 16, 16), 10) and not judge.applies((3, 16, 16), 10) and not judge.applies((1, 16, 16), 3)
    assert judge(images, labels) > 0.9
    assert judge(images, (labels + 1) % 10) < 0.1


def test_eval_reports_the_conditional_accuracy_at_each_guidance(label_pipeline, label_snn, tmp_path):
    out = tmp_path / "eval"
    result = invoke(
        evaluate, "--model", label_snn, "--reference-model", label_pipeline, "-T", 2, "--num-images", 6,
        "--steps", 2, "--guidance-scale", "1,2", "--noise-images", 4, "--noise-timesteps", 2, "--no-progress",
        "--cache-dir", tmp_path / "cache", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["variants"]
    assert [(row["network"], row["guidance_scale"]) for row in rows] == [
        (name, scale) for scale in (1.0, 2.0) for name in ("ANN", "QCFS L=8", "SNN T=2")
    ]
    for row in rows:
        assert 0 <= row["conditional_accuracy"] <= 1
        assert row["accuracy_ratio"] is None or row["accuracy_ratio"] >= 0
    assert rows[0]["accuracy_ratio"] == rows[3]["accuracy_ratio"] == 1.0
    assert rows[0]["fd"] != rows[3]["fd"]  # guidance changed the ANN's samples
    assert "cond. accuracy" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def stable_diffusion_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline with random weights, saved as diffusers saves a hub repository."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd")
    text_encoder, tokenizer = tiny_text_encoder(root)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=make_conditional(dtype=torch.float32),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def test_convert_a_stable_diffusion_directory_replaces_only_the_unet(stable_diffusion_dir, tmp_path):
    out = tmp_path / "sd-snn"
    refused = invoke(convert, "--model", stable_diffusion_dir, "--output", out)
    assert refused.exit_code == 2 and "needs prompts" in refused.output and not out.exists()

    result = invoke(convert, "--model", stable_diffusion_dir, "--no-calibrate", "-T", 2, "--output", out)
    assert result.exit_code == 0, result.output
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        comparison = filecmp.dircmp(stable_diffusion_dir / part, out / part)
        assert comparison.left_list == comparison.right_list and not comparison.diff_files, part
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert isinstance(pipe.unet, SpikingUNet2DConditionModel) and pipe.unet.config.timesteps == 2
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a b", "c"], num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()

    sampled = invoke(sample, "--model", out, "-n", 1, "--steps", 1, "--output", tmp_path / "never")
    assert sampled.exit_code == 2 and "conditioned on text" in sampled.output


def test_energy_and_export_take_the_label_conditional_model(label_snn, tmp_path):
    from spiking_diffusers.commands import energy, export

    result = invoke(
        energy, "--model", label_snn, "--steps", 2, "--num-images", 1, "--guidance-scale", 2, "--output",
        tmp_path / "energy",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "energy" / "energy.json").read_text())
    assert report["settings"]["guidance_scale"] == 2.0
    assert report["totals"]["unet_evaluations_per_image"] == 4  # 2 steps, each conditional + unconditional

    result = invoke(export, "--model", label_snn, "--output", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    assert "step skipped" in result.output
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert list(manifest["graphs"]) == ["snn"]
    assert manifest["graphs"]["snn"]["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
