"""SpikingDiffusionPipeline with every supported scheduler, threshold guidance, plain UNets, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import SpikingDiffusionPipeline, convert, quantize
from spiking_diffusers.pipelines import (
    GROUPS,
    SCHEDULERS,
    get_threshold_scales,
    make_scheduler,
    scaled_thresholds,
    set_threshold_scale,
    site_group,
)


@pytest.fixture(scope="module")
def unet():
    return make_unet(TINY_CONFIGS["attention"])


@pytest.fixture(scope="module")
def snn(unet):
    return convert(quantize(unet, levels=4), timesteps=4)


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def sample(pipe, n: int = 2, seed: int = 0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(batch_size=n, generator=generators(n, seed), output_type="np", **kwargs).images


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_gives_finite_images_of_the_right_shape(snn, name):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=make_scheduler(name, DDPMScheduler().config))
    images = sample(pipe, eta=0.5 if name == "ddim" else 0.0)
    assert images.shape == (2, 8, 8, 1)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    pil = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (8, 8)


def test_eta_is_refused_where_the_scheduler_has_none(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="eta"):
        sample(pipe, eta=0.5)


def test_threshold_scale_one_reproduces_default_and_other_values_change_output(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    default = sample(pipe)
    assert np.array_equal(sample(pipe, threshold_scale=1.0), default)
    lowered = sample(pipe, threshold_scale=0.9)
    assert np.abs(lowered - default).max() > 1e-3
    # per call: the model's factors are restored afterwards, including a factor set before the call
    assert set(get_threshold_scales(snn).values()) == {1.0}
    with scaled_thresholds(snn, 0.95):
        sample(pipe, threshold_scale=0.9)
        assert set(get_threshold_scales(snn).values()) == {0.95}
    assert set(get_threshold_scales(snn).values()) == {1.0}


def test_per_group_threshold_scale(snn):
    assert {site_group(name) for name in snn.neurons()} == set(GROUPS)
    previous = set_threshold_scale(snn, {"down": 0.9, "out": 1.1})
    try:
        for name, factor in get_threshold_scales(snn).items():
            assert factor == {"down": 0.9, "out": 1.1}.get(site_group(name), 1.0), name
    finally:
        set_threshold_scale(snn, 1.0)
    assert set(previous.values()) == {1.0}

    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    default, down_only, everywhere = (sample(pipe, threshold_scale=s) for s in (None, {"down": 0.9}, 0.9))
    assert np.abs(down_only - default).max() > 1e-3 and np.abs(down_only - everywhere).max() > 1e-3
    assert np.array_equal(sample(pipe, threshold_scale=dict.fromkeys(GROUPS, 1.0)), default)
    with pytest.raises(ValueError, match="groups are"):
        sample(pipe, threshold_scale={"encoder": 0.9})
    with pytest.raises(ValueError, match="> 0"):
        sample(pipe, threshold_scale=-1.0)


def test_plain_unet_works_and_spiking_options_are_refused(unet):
    pipe = SpikingDiffusionPipeline(unet=unet, scheduler=DDIMScheduler())
    images = sample(pipe)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert np.array_equal(sample(pipe, threshold_scale=1.0), images)
    with pytest.raises(ValueError, match="spiking UNets only"):
        sample(pipe, threshold_scale=0.99)
    with pytest.raises(ValueError, match="spiking UNets only"):
        sample(pipe, snn_timesteps=4)


def test_save_and_load_round_trip_through_the_generic_loader(snn, tmp_path):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert type(loaded) is SpikingDiffusionPipeline
    assert type(loaded.unet) is type(snn) and type(loaded.scheduler) is DDPMScheduler
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert np.array_equal(sample(loaded), sample(pipe))


def test_per_sample_generators_make_images_independent_of_the_batch_split(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDPMScheduler())  # stochastic steps use the generators
    whole = sample(pipe, n=4)
    split = np.concatenate([sample(pipe, n=2, seed=0), sample(pipe, n=2, seed=2)])
    np.testing.assert_allclose(split, whole, atol=1e-6)


def test_given_latents_replace_the_generated_noise(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    latents = torch.stack([torch.randn(1, 8, 8, generator=g, dtype=torch.float64) for g in generators(2)])
    given = pipe(latents=latents, num_inference_steps=2, output_type="np").images
    np.testing.assert_array_equal(given, sample(pipe))


def test_each_unet_call_starts_a_fresh_simulation(snn):
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = snn(x, 500).sample
        snn(torch.randn_like(x) * 3, 10)  # would leave membranes charged if state leaked
        assert torch.equal(snn(x, 500).sample, first)
        assert not torch.equal(snn(x, 500, snn_timesteps=2).sample, first)
    assert all(neuron.membrane is None for neuron in snn.neurons().values())
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    assert not np.array_equal(sample(pipe, snn_timesteps=2), sample(pipe))
