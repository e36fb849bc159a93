"""Tiny diffusers UNets shared by the tests: every supported block type, and the real CIFAR-10 layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

_TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1)

TINY_CONFIGS = {
    "attention": dict(
        _TINY,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    "resnet_resample": dict(
        _TINY,
        down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D"),
        norm_num_groups=8,
        downsample_type="resnet",
        upsample_type="resnet",
        time_embedding_type="learned",
        num_train_timesteps=1000,
    ),
    "skip_fourier": dict(
        _TINY,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),  # the skip blocks hard-code 32 groups in their attention
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        time_embedding_type="fourier",
    ),
    "scale_shift": dict(
        _TINY,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        num_class_embeds=3,
    ),
    "no_mid": dict(
        _TINY,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        mid_block_type=None,
        act_fn="mish",
    ),
}


def make_unet(config: dict, seed: int = 0, dtype: torch.dtype = torch.float64) -> UNet2DModel:
    """A randomly initialised UNet in eval mode (float64 so spike decisions do not hinge on rounding)."""
    torch.manual_seed(seed)
    return UNet2DModel(**config).to(dtype).eval()


def make_inputs(unet: UNet2DModel, batch: int = 2, seed: int = 0):
    """Noisy samples, diffusion timesteps and (for class-conditional configs) labels for ``unet``."""
    generator = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
    timestep = torch.linspace(5, 900, batch).long()
    kwargs = {"class_labels": torch.arange(batch) % cfg.num_class_embeds} if cfg.num_class_embeds else {}
    return sample.to(unet.dtype), timestep, kwargs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def pytest_configure(config):
    """Under pytest-xdist each worker runs torch on one thread: two workers of two threads each on CI's two
    cores would oversubscribe them, which is several times slower than one thread each."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Calibration samples and metric statistics go to a per-run cache, never the user's."""
    os.environ["SDM_CACHE_DIR"] = str(tmp_path_factory.mktemp("sdm-cache"))


@pytest.fixture
def single_thread():
    """Run in-process work on one thread, like the OMP_NUM_THREADS=1 subprocesses it is compared with:
    results that must match bit for bit need the same reduction order, which depends on the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request) -> dict:
    return TINY_CONFIGS[request.param]


def save_digit_sized_models(root: Path) -> dict[str, Path]:
    """A tiny 1x16x16 ANN pipeline (the digit metric applies) and its spiking pipeline, saved under ``root``;
    ``cache`` is a fresh cache directory beside them."""
    from spiking_diffusers import SpikingDiffusionPipeline, convert, quantize

    unet = make_unet(dict(TINY_CONFIGS["attention"], sample_size=16), dtype=torch.float32)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "ann")
    snn = convert(quantize(unet, levels=2), timesteps=2)
    SpikingDiffusionPipeline(unet=snn, scheduler=DDPMScheduler()).save_pretrained(root / "snn")
    return {"ann": root / "ann", "snn": root / "snn", "cache": root / "cache"}


# --- conditional (Stable-Diffusion-style) UNets --------------------------------------------------------

CROSS = 12


def make_conditional(seed: int = 0, dtype=torch.float64, **overrides) -> UNet2DConditionModel:
    """A tiny Stable-Diffusion-style UNet: cross-attention down, mid and up blocks, GEGLU feed-forwards."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).to(dtype).eval()


def tiny_text_encoder(root: Path):
    """A CLIP text encoder with random weights and a tokenizer over a tiny local vocabulary (no download)."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CROSS, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.CLIPTextModel(config).eval(), tokenizer


def tiny_vae() -> AutoencoderKL:
    """A one-level VAE with random weights, latent channels 4 (the tiny Stable Diffusion pipeline's)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, sample_size=8,
    ).eval()  # fmt: skip
