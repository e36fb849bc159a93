"""``sdm-eval`` end to end on a tiny random UNet, and the pieces that make its comparison paired."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import SpikingDiffusionPipeline, convert, quantize
from spiking_diffusers.commands.evaluate import main
from spiking_diffusers.evaluation import Variant, VariantError, image_generators, prepare_variants, sample_variant
from spiking_diffusers.metrics import paired_psnr
from spiking_diffusers.pipelines import make_scheduler

DIGIT_UNET = dict(TINY_CONFIGS["attention"], sample_size=16)
"""1-channel 16x16, so the shipped digit classifier applies."""

FAST = ["--num-images", "6", "--batch-size", "4", "--steps", "2", "--noise-timesteps", "3", "--noise-images", "4"]
FAST += ["--grid-rows", "2", "--no-progress", "--device", "cpu"]
FAST += ["--calibration-samples", "4", "--calibration-steps", "2", "--snn-steps", "1"]  # the recipe, in miniature
FAST += ["--calibration-set-size", "64"]


@pytest.fixture(scope="module")
def ann() -> UNet2DModel:
    return make_unet(DIGIT_UNET, dtype=torch.float32)


@pytest.fixture(scope="module")
def ann_dir(ann, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-ann")
    DDPMPipeline(unet=ann, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def run(*args: str, cache_dir: str):
    result = CliRunner().invoke(main, [*args, *FAST, "--cache-dir", cache_dir])
    return result


def test_sdm_eval_writes_report_table_and_grid(ann_dir, cache_dir, tmp_path) -> None:
    out = tmp_path / "eval"
    result = run("--model", ann_dir, "--output", str(out), "-T", "1,2", "--fd-splits", "2", cache_dir=cache_dir)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in report["variants"]]
    assert names == ["ANN", "QCFS L=4", "SNN T=1", "QCFS L=8", "SNN T=2"]  # default: burst B = 4, L = BT
    assert report["noise_timesteps"] == [1, 500, 999]
    assert report["settings"]["scheduler"] == "ddim" and report["settings"]["num_images"] == 6
    assert report["settings"]["real_reference_images"] == 1797
    assert report["settings"]["execution"] == "stepwise"  # auto, on the CPU
    ann, *others = report["variants"]
    assert ann["fd_ratio"] == 1.0 and ann["psnr_mean"] is None and ann["noise_error"] is None
    for row in report["variants"]:
        assert math.isfinite(row["fd"]) and len(row["fd_splits"]) == 2 and row["fd_ratio_split_std"] is not None
        assert row["sampling_seconds"] > 0
    for row in others:
        assert math.isfinite(row["psnr_mean"]) and len(row["noise_error"]) == 3
    assert any("1000" in warning for warning in report["warnings"])

    table = (out / "report.md").read_text()
    assert "| SNN T=2 | 8 | 2 |" in table and "FD / ANN" in table  # L = BT with the default burst B = 4
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Wrote" in result.output


def test_calibrated_qcfs_model_is_compared_with_the_reference_ann(ann, ann_dir, cache_dir, tmp_path) -> None:
    qcfs_dir = tmp_path / "qcfs"
    SpikingDiffusionPipeline(unet=quantize(ann, levels=2), scheduler=DDPMScheduler()).save_pretrained(qcfs_dir)
    out = tmp_path / "eval"

    other_dir = tmp_path / "other-ann"
    other = make_unet(dict(DIGIT_UNET, block_out_channels=(8, 16)), dtype=torch.float32)
    DDPMPipeline(unet=other, scheduler=DDPMScheduler()).save_pretrained(other_dir)
    result = run(
        "--model", str(qcfs_dir), "--reference-model", str(other_dir), "--output", str(out), cache_dir=cache_dir
    )
    assert result.exit_code == 2 and "block_out_channels" in result.output and "--reference-model" in result.output

    args = ("--model", str(qcfs_dir), "--reference-model", ann_dir, "--output", str(out))
    result = run(*args, "-T", "1,2", cache_dir=cache_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["variants"]] == ["ANN", "QCFS L=2", "SNN T=1", "SNN T=2"]
    assert report["settings"]["reference_model"] == ann_dir

    result = run(*args, "--overwrite", "--levels", "3", cache_dir=cache_dir)
    assert result.exit_code == 2 and "L = 2" in result.output


def test_images_the_classifier_cannot_read_are_refused_before_sampling(tmp_path, cache_dir) -> None:
    model_dir = tmp_path / "rgb"
    unet = make_unet(TINY_CONFIGS["skip_fourier"], dtype=torch.float32)  # 3-channel 8x8
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(model_dir)
    result = run("--model", str(model_dir), "--output", str(tmp_path / "out"), cache_dir=cache_dir)
    assert result.exit_code == 2 and "--inception-weights" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_timesteps_are_a_usage_error(ann_dir, cache_dir, tmp_path) -> None:
    result = run("--model", ann_dir, "--output", str(tmp_path / "o"), "-T", "2,zero", cache_dir=cache_dir)
    assert result.exit_code == 2 and "--timesteps" in result.output


def test_every_variant_sees_the_same_noise_whatever_the_batch_split(ann) -> None:
    first = image_generators(seed=3, indices=range(0, 5))
    later = image_generators(seed=3, indices=range(3, 5))
    assert torch.equal(torch.randn(4, generator=first[3]), torch.randn(4, generator=later[0]))
    assert not torch.equal(
        torch.randn(4, generator=image_generators(0, range(1))[0]), torch.randn(4, generator=first[0])
    )

    variant = Variant("ANN", "ann", ann)
    for name in ("ddim", "ddpm"):  # deterministic and stochastic: step noise comes from the same generators
        scheduler = make_scheduler(name, dict(DDPMScheduler().config))
        whole, _ = sample_variant(variant, scheduler, 5, steps=2, batch_size=5, progress=False)
        split, _ = sample_variant(variant, scheduler, 5, steps=2, batch_size=2, progress=False)
        assert torch.allclose(whole, split, atol=1e-5)

    qcfs = Variant("QCFS", "qcfs", quantize(ann, levels=64))
    scheduler = make_scheduler("ddim", dict(DDPMScheduler().config))
    ann_images, _ = sample_variant(variant, scheduler, 4, steps=2, progress=False)
    qcfs_images, _ = sample_variant(qcfs, scheduler, 4, steps=2, progress=False)
    other_noise, _ = sample_variant(variant, scheduler, 4, steps=2, seed=1, progress=False)
    assert paired_psnr(qcfs_images, ann_images).mean() > paired_psnr(other_noise, ann_images).mean() + 5


def test_prepare_variants_shares_a_fixed_level_and_recovers_qcfs_from_an_snn(ann) -> None:
    variants = prepare_variants(ann, None, timesteps=[2, 4], levels=4, execution="stepwise")
    assert [v.name for v in variants] == ["ANN", "QCFS L=4", "SNN T=2", "SNN T=4"]
    assert variants[2].unet is variants[3].unet and variants[3].forward_kwargs == {"spike_steps": 4}
    assert variants[3].unet.config.execution == "stepwise"

    qnet = quantize(ann, levels=2)
    snn = convert(qnet, timesteps=2, neuron="signed_if")
    variants = prepare_variants(snn, ann, timesteps=[1, 2])
    assert [v.name for v in variants] == ["ANN", "QCFS L=2", "SNN T=1", "SNN T=2"]
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(variants[1].unet(x, t).sample, qnet(x, t).sample)
    with pytest.raises(VariantError, match="signed_if"):
        prepare_variants(snn, ann, timesteps=[2], neuron="if")
    with pytest.raises(VariantError, match="original network"):
        prepare_variants(qnet, None, timesteps=[2])


def test_a_t_schedule_is_one_more_snn_variant_with_its_mean_t(ann) -> None:
    variants = prepare_variants(ann, None, timesteps=[2], t_schedules=["2,4x1", "2x3", "2,4x1"], execution="stepwise")
    assert [v.name for v in variants] == ["ANN", "QCFS L=2", "SNN T=2", "SNN T=2,4x1"]  # "2x3" is T = 2
    plain, scheduled = variants[2], variants[3]
    assert scheduled.unet is plain.unet and scheduled.levels == 2 and scheduled.t_label == "2,4x1"
    assert scheduled.forward_kwargs == {"spike_steps": scheduled.t_schedule}
    assert scheduled.mean_timesteps(3) == pytest.approx(8 / 3) and plain.mean_timesteps(3) == 2.0
    assert variants[0].mean_timesteps(3) is None and variants[1].mean_timesteps(3) is None
    # L follows --levels, else the T most steps take; an SNN model is simulated on the schedule as it is
    assert prepare_variants(ann, None, [2], levels=3, t_schedules=["2,4x1"])[-1].levels == 3
    snn = convert(quantize(ann, levels=2), timesteps=2)
    names = [v.name for v in prepare_variants(snn, ann, timesteps=[1], t_schedules=["1,3x1"])]
    assert names == ["ANN", "QCFS L=2", "SNN T=1", "SNN T=1,3x1"]
    with pytest.raises(VariantError, match="accepted: T for every step"):
        prepare_variants(ann, None, timesteps=[2], t_schedules=["2,4"])


def test_sdm_eval_reports_a_t_schedule_and_its_mean_t(ann_dir, cache_dir, tmp_path) -> None:
    out = tmp_path / "eval"
    args = ("--model", ann_dir, "--no-calibrate", "-T", "2", "--t-schedule", "2,4x1", "--output", str(out))
    result = run(*args, cache_dir=cache_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["variants"]] == ["ANN", "QCFS L=2", "SNN T=2", "SNN T=2,4x1"]
    assert report["settings"]["t_schedules"] == ["2,4x1"]
    rows = {row["name"]: row for row in report["variants"]}
    assert rows["SNN T=2,4x1"]["timesteps"] == "2,4x1" and rows["SNN T=2,4x1"]["mean_timesteps"] == 3.0
    assert rows["SNN T=2"]["mean_timesteps"] == 2.0 and rows["ANN"]["mean_timesteps"] is None
    # noise timesteps 1, 500, 999 against DDIM-2 steps at 500 and 0: the T of the nearest step
    assert rows["SNN T=2,4x1"]["noise_error_snn_timesteps"] == [4, 2, 2]
    table = (out / "report.md").read_text()
    assert "| network | L | T | mean T |" in table and "| SNN T=2,4x1 | 2 | 2,4x1 | 3 |" in table

    for bad, message in (("4x3", "gives T for 3 denoising steps, but there are 2"), ("2,", "has an empty item")):
        result = run(*args[:-4], "--t-schedule", bad, "--output", str(tmp_path / "bad"), cache_dir=cache_dir)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert "accepted: T for every step" in errors[0] and not (tmp_path / "bad").exists()
