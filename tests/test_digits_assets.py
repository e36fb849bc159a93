"""The digits data and the assets shipped inside the package (offline, CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from spiking_diffusers.digits import (
    SHIPPED_CLASSIFIER_PATH,
    SHIPPED_CONDITIONAL_PATH,
    SHIPPED_MODEL_PATH,
    DigitClassifier,
    load_digit_dataset,
    load_digit_images,
    split_indices,
)


@pytest.fixture(scope="module")
def pipeline():
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(SHIPPED_MODEL_PATH)


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return DigitClassifier.from_pretrained(SHIPPED_CLASSIFIER_PATH)


def test_load_digit_images_shapes_and_range() -> None:
    x = load_digit_images()
    assert x.shape == (1797, 1, 16, 16)
    assert x.dtype == torch.float32
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    assert x.min().item() == -1.0 and x.max().item() > 0.9  # background at -1, strokes near 1
    assert load_digit_images(size=8).shape == (1797, 1, 8, 8)
    assert load_digit_images(size=32, split="test").shape[-2:] == (32, 32)


def test_split_is_disjoint_stratified_and_deterministic() -> None:
    x_train, y_train = load_digit_dataset(split="train")
    x_test, y_test = load_digit_dataset(split="test")
    assert len(x_train) + len(x_test) == 1797
    assert 0.19 < len(x_test) / 1797 < 0.21
    # Every class is held out in the same proportion.
    frac = torch.bincount(y_test, minlength=10) / (
        torch.bincount(y_test, minlength=10) + torch.bincount(y_train, minlength=10)
    )
    assert ((frac - 0.2).abs() < 0.01).all()
    _, labels = load_digit_dataset(split="all")
    train_idx = split_indices(labels.numpy(), "train")
    test_idx = split_indices(labels.numpy(), "test")
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert torch.equal(load_digit_images(split="test"), x_test)  # deterministic
    assert not torch.equal(load_digit_images(split="test", seed=1), x_test)
    with pytest.raises(ValueError):
        load_digit_images(split="valid")  # type: ignore[arg-type]


def test_shipped_pipeline_directory_layout() -> None:
    root = Path(SHIPPED_MODEL_PATH)
    assert (root / "model_index.json").is_file()
    assert (root / "unet" / "config.json").is_file()
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (root / "scheduler" / "scheduler_config.json").is_file()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 8 * 2**20


def test_shipped_pipeline_loads_and_runs(pipeline) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = pipeline.unet
    assert isinstance(unet, UNet2DModel)
    assert isinstance(pipeline.scheduler, DDPMScheduler)
    assert pipeline.scheduler.config.num_train_timesteps == 1000
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert unet.config.sample_size == 16
    assert unet.config.in_channels == unet.config.out_channels == 1
    n_params = sum(p.numel() for p in unet.parameters())
    assert 0.3e6 < n_params < 2e6
    # A trained model, not just a finite one: it recovers the noise added to held-out digits (a guess that
    # ignores the input, another normal draw, is off by sqrt(2) = 1.41).
    clean = load_digit_images(split="test")[:8]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    for t in (10, 500, 900):
        timesteps = torch.full((len(clean),), t)
        with torch.no_grad():
            predicted = unet(pipeline.scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        assert predicted.shape == clean.shape
        assert ((predicted - noise).norm() / noise.norm()).item() < 0.5, t


def test_shipped_unet_has_attention(pipeline) -> None:
    from diffusers.models.attention_processor import Attention

    attn = [m for m in pipeline.unet.modules() if isinstance(m, Attention)]
    assert len(attn) >= 3
    assert any("Attn" in t for t in pipeline.unet.config.down_block_types)
    assert any("Attn" in t for t in pipeline.unet.config.up_block_types)


def test_shipped_classifier_accuracy(classifier: DigitClassifier) -> None:
    assert not classifier.training
    x, y = load_digit_dataset(split="test")
    acc = (classifier.predict_proba(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.95
    feats = classifier.features(x[:5])
    assert feats.shape == (5, classifier.feature_dim)
    assert classifier(x[:5]).shape == (5, 10)


def test_classifier_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DigitClassifier(channels=(4, 8), feature_dim=16).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["feature_dim"] == 16
    loaded = DigitClassifier.from_pretrained(tmp_path)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(model.features(x), loaded.features(x))


def test_shipped_conditional_model_draws_the_digit_it_is_asked_for(classifier: DigitClassifier) -> None:
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

    from spiking_diffusers import LabelTokens, SpikingDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SHIPPED_CONDITIONAL_PATH)
    assert isinstance(pipe, SpikingDiffusionPipeline) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.label_tokens, LabelTokens) and pipe.label_tokens.config.num_classes == 10
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(20) % 10
    generators = [torch.Generator().manual_seed(i) for i in range(20)]
    images = pipe(batch_size=20, generator=generators, num_inference_steps=10, output_type="pt",
                  class_labels=labels, guidance_scale=1.5).images * 2 - 1  # fmt: skip
    with torch.no_grad():
        predicted = classifier.predict_proba(images).argmax(-1)
    assert (predicted == labels).float().mean() >= 0.8
    info = json.loads((Path(SHIPPED_CONDITIONAL_PATH) / "training.json").read_text())
    assert info["preset"] == "conditional" and info["eval"]["guidance_1"]["conditional_accuracy"] > 0.95
