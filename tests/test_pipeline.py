"""SpikingDiffusionPipeline with every supported scheduler, threshold guidance, plain UNets, save/load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import SpikingDiffusionPipeline, convert, quantize
from spiking_diffusers.energy.accounting import OperationCounter
from spiking_diffusers.errors import NonFiniteError
from spiking_diffusers.pipelines import (
    GROUPS,
    SCHEDULERS,
    get_threshold_scales,
    make_scheduler,
    scaled_thresholds,
    set_threshold_scale,
    site_group,
)
from spiking_diffusers.pipelines.spiking_pipeline import step_accepts


@pytest.fixture(scope="module")
def unet():
    return make_unet(TINY_CONFIGS["attention"])


@pytest.fixture(scope="module")
def qnet(unet):
    return quantize(unet, levels=4)


@pytest.fixture(scope="module")
def snn(qnet):
    return convert(qnet, timesteps=4)


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def sample(pipe, n: int = 2, seed: int = 0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(batch_size=n, generator=generators(n, seed), output_type="np", **kwargs).images


def reference_sample(unet, scheduler, latents: torch.Tensor, seed: int = 0, steps: int = 2, eta: float = 0.0):
    """The denoising loop written out with the scheduler API alone: the raw sample, before any scaling or clamp."""
    scheduler.set_timesteps(steps)
    step_kwargs = {"eta": eta} if step_accepts(scheduler, "eta") else {}
    if step_accepts(scheduler, "generator"):
        step_kwargs["generator"] = generators(len(latents), seed)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(noise, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_gives_the_raw_sample_scaled_to_images_in_every_output_type(snn, name):
    """pt, np and pil are the same images, and they are the scheduler's own result mapped from [-1, 1] to
    [0, 1]; the raw sample leaves [-1, 1], so the clamp is seen to act on the final sample only."""
    config = DDPMScheduler(clip_sample=False).config  # DDPM and DDIM clip every step's x0 estimate by default
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=make_scheduler(name, config))
    pipe.set_progress_bar_config(disable=True)
    eta = 0.5 if name == "ddim" else 0.0
    latents = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    raw = reference_sample(snn, make_scheduler(name, config), latents, eta=eta)
    assert raw.abs().max() > 1  # else the clamp below would be untested
    images = {
        kind: pipe(latents=latents, generator=generators(2), num_inference_steps=2, eta=eta, output_type=kind).images
        for kind in ("pt", "np", "pil")
    }
    assert images["pt"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(images["pt"], (raw / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(images["np"], images["pt"].permute(0, 2, 3, 1).float().numpy())
    assert [image.size for image in images["pil"]] == [(8, 8)] * 2
    as_bytes = (images["np"][..., 0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in images["pil"]]), as_bytes)


def test_a_prediction_that_overflows_is_reported_not_clamped_into_an_image(unet):
    exploding = copy.deepcopy(unet)
    with torch.no_grad():
        exploding.conv_out.bias.fill_(float("inf"))
    pipe = SpikingDiffusionPipeline(unet=exploding, scheduler=DDIMScheduler())
    with pytest.raises(NonFiniteError, match="after 2 denoising steps is not finite"):
        sample(pipe)


def test_eta_is_refused_where_the_scheduler_has_none(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="eta"):
        sample(pipe, eta=0.5)


def spikes_by_group(pipe, steps: int = 1, **kwargs) -> dict[str, int]:
    """Spikes every block group emits over one sampling run, counted by the operation counter."""
    with OperationCounter(pipe.unet) as counter:
        sample(pipe, num_inference_steps=steps, **kwargs)
    counts = dict.fromkeys(GROUPS, 0)
    for name, site in counter.accounting.sites.items():
        counts[site_group(name)] += site.spikes
    return counts


def test_a_lower_threshold_scale_makes_the_network_fire_more_and_a_higher_one_less(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    default = sample(pipe)
    assert np.array_equal(sample(pipe, threshold_scale=1.0), default)
    totals = {scale: sum(spikes_by_group(pipe, steps=2, threshold_scale=scale).values()) for scale in (0.9, 1.0, 1.1)}
    assert totals[0.9] > totals[1.0] > totals[1.1], totals
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

    # One denoising step, so a group's change reaches no earlier group through the next step's input: the
    # groups before the scaled one (in the order the UNet runs them) fire exactly as before, the scaled
    # group fires more at 0.9 and less at 1.1. Later groups read its output, so they may change too.
    order = ["time_embedding", "down", "mid", "up", "out"]
    assert sorted(order) == sorted(GROUPS)
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    default = spikes_by_group(pipe)
    for position, group in enumerate(order):
        lowered, raised = (spikes_by_group(pipe, threshold_scale={group: scale}) for scale in (0.9, 1.1))
        for earlier in order[:position]:
            assert lowered[earlier] == raised[earlier] == default[earlier], (group, earlier)
        assert lowered[group] > default[group] > raised[group], (group, lowered, default, raised)
    assert spikes_by_group(pipe, threshold_scale=dict.fromkeys(GROUPS, 1.0)) == default
    assert np.array_equal(sample(pipe, threshold_scale=dict.fromkeys(GROUPS, 1.0)), sample(pipe))
    with pytest.raises(ValueError, match="groups are"):
        sample(pipe, threshold_scale={"encoder": 0.9})
    with pytest.raises(ValueError, match="> 0"):
        sample(pipe, threshold_scale=-1.0)


def test_plain_unet_works_and_spiking_options_are_refused(unet):
    pipe = SpikingDiffusionPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    latents = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    images = pipe(latents=latents, num_inference_steps=2, output_type="pt").images
    raw = reference_sample(unet, DDIMScheduler(clip_sample=False), latents)
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    assert np.array_equal(sample(pipe, threshold_scale=1.0), sample(pipe))
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
    assert all(neuron.membrane is None for neuron in snn.neurons().values())


def test_snn_timesteps_per_call_is_the_network_converted_at_that_T(qnet, snn):
    """A T = 4 model run with ``snn_timesteps=2`` is the same QCFS network converted at T = 2, per UNet call
    and over a whole sampling run."""
    at_two = convert(qnet, timesteps=2)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        overridden = snn(x, 500, snn_timesteps=2).sample
        torch.testing.assert_close(overridden, at_two(x, 500).sample, rtol=0, atol=1e-12)
        assert not torch.allclose(overridden, snn(x, 500).sample, atol=1e-3)  # T = 2 is not what T = 4 gives
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    reference = SpikingDiffusionPipeline(unet=at_two, scheduler=DDIMScheduler())
    np.testing.assert_allclose(sample(pipe, snn_timesteps=2), sample(reference), rtol=0, atol=1e-12)
