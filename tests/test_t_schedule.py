"""T schedules: the grammar, its refusals, and the pipeline giving each denoising step its own T."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler
from PIL import Image

from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import SpikingDiffusionPipeline, convert, quantize
from spiking_diffusers.commands.sample import main as sample_main
from spiking_diffusers.pipelines import SCHEDULE_FORM, TSchedule, TScheduleError, make_scheduler
from spiking_diffusers.pipelines.t_schedule import call_steps


@pytest.fixture(scope="module")
def unet():
    return make_unet(TINY_CONFIGS["attention"])


@pytest.fixture(scope="module")
def snn(unet):
    return convert(quantize(unet, levels=4), timesteps=4)


def generators(n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


def sample(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=generators(), num_inference_steps=steps, output_type="np", **kwargs).images


def unet_calls(pipe, **kwargs) -> list:
    """The ``snn_timesteps`` every UNet call of one sampling run received."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kw: seen.append(kw.get("spike_steps")), with_kwargs=True
    )
    try:
        sample(pipe, **kwargs)
    finally:
        hook.remove()
    return seen


# -- the grammar ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps", "expected", "canonical"),
    [
        ("4", 3, [4, 4, 4], "4"),
        ("4,16x3", 5, [4, 4, 16, 16, 16], "4,16x3"),
        ("4,16x3", 3, [16, 16, 16], "4,16x3"),  # the filling T may fill no step
        (" 4 , 16 X 2 ", 3, [4, 16, 16], "4,16x2"),
        ("16x2,4,16x1", 6, [16, 16, 4, 4, 4, 16], "16x2,4,16x1"),
        ("8x2,16x2", 4, [8, 8, 16, 16], "8x2,16x2"),
        ("2x1,3x1,5x1", 3, [2, 3, 5], "2x1,3x1,5x1"),
        ("1024", 1, [1024], "1024"),
    ],
)
def test_the_text_form_gives_one_t_per_denoising_step(text, steps, expected, canonical):
    schedule = TSchedule.parse(text)
    assert schedule.per_step(steps) == expected
    assert schedule.mean(steps) == pytest.approx(sum(expected) / steps)
    assert str(schedule) == canonical and TSchedule.parse(str(schedule)) == schedule


def test_the_mean_t_of_the_issue_example():
    """4 for most of 20 steps and 16 for the last 3: (17 * 4 + 3 * 16) / 20 = 5.8, what energy pays."""
    schedule = TSchedule.parse("4,16x3")
    assert schedule.mean(20) == pytest.approx(5.8) and schedule.base == 4 and schedule.max == 16


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("4,", "has an empty item"),
        (",4", "has an empty item"),
        ("4,,16x3", "has an empty item"),
        ("four", "item 'four', which is neither T nor TxK"),
        ("4.5", "item '4.5', which is neither T nor TxK"),
        ("4x-1", "item '4x-1', which is neither T nor TxK"),
        ("-4", "item '-4', which is neither T nor TxK"),
        ("4x", "item '4x', which is neither T nor TxK"),
        ("0", "T = 0 is out of range"),
        ("4,0x3", "T = 0 is out of range"),
        ("4,2000x1", "T = 2000 is out of range"),
        ("4,16x0", "item '16x0' gives T to 0 steps"),
        ("4,8", "more than one bare T"),
    ],
)
def test_a_text_schedule_that_cannot_work_is_refused_naming_the_accepted_form(text, problem):
    with pytest.raises(TScheduleError, match="accepted: T for every step") as info:
        TSchedule.parse(text)
    assert problem in str(info.value) and SCHEDULE_FORM in str(info.value)


@pytest.mark.parametrize(
    ("text", "steps", "problem"),
    [
        ("8x2,16x2", 5, "gives T for 4 denoising steps, but there are 5"),
        ("8x2,16x2", 3, "gives T for 4 denoising steps, but there are 3"),
        ("4,16x3", 2, "its TxK items take 3 denoising steps, more than the 2 there are"),
    ],
)
def test_a_schedule_that_does_not_fit_the_steps_is_refused(text, steps, problem):
    with pytest.raises(TScheduleError, match="accepted: T for every step") as info:
        TSchedule.parse(text).per_step(steps)
    assert problem in str(info.value)


def test_python_forms():
    assert TSchedule.coerce(4).per_step(3) == [4, 4, 4]
    assert TSchedule.coerce([4, 4, 16]) == TSchedule.coerce((4, 4, 16)) == TSchedule.parse("4x2,16x1")
    assert TSchedule.coerce(np.int64(4)) == TSchedule.constant(4)
    schedule = TSchedule.parse("4,16x1")
    assert TSchedule.coerce(schedule) is schedule
    assert TSchedule.coerce([2, 8, 2]).base == 2 and TSchedule.coerce([8, 2, 8]).base == 8  # the commonest T


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([], TScheduleError, "spike_steps is an empty list; give one T per denoising step"),
        ([4, 0], TScheduleError, "spike_steps[1] must be in the range 1<=x<=1024, got 0"),
        ([4, 2.0], TypeError, "spike_steps[1] must be an int, got float 2.0"),
        (0, TScheduleError, "spike_steps must be in the range 1<=x<=1024, got 0"),
        (4.0, TypeError, "spike_steps must be an int T, a list of one int T per denoising step"),
        (True, TypeError, "spike_steps must be an int T, a list of one int T per denoising step"),
        ({4: 2}, TypeError, "spike_steps must be an int T, a list of one int T per denoising step"),
    ],
)
def test_a_python_schedule_that_cannot_work_is_refused_by_name(value, error, message):
    with pytest.raises(error) as info:
        TSchedule.coerce(value)
    assert message in str(info.value)


def test_calls_map_onto_denoising_steps():
    assert call_steps([800, 600, 400], 3) == [0, 1, 2]
    assert call_steps([800, 600, 600, 400], 3) == [0, 1, 1, 2]  # PNDM's warm-up evaluates 600 twice
    assert call_steps([9, 8, 7, 6], 2) == [0, 0, 1, 1]  # no rule: in proportion, the last call on the last step
    schedule = TSchedule.parse("2,5x1")
    assert schedule.per_call([800, 600, 600, 400], 3) == [2, 2, 2, 5]
    # a diffusion timestep takes the T of the nearest denoising step
    assert schedule.at_timesteps([999, 500, 401, 1], [800, 600, 400], 3) == [2, 2, 5, 5]


# -- the pipeline --------------------------------------------------------------------------------------------


def test_each_unet_call_gets_its_steps_t(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    assert unet_calls(pipe, steps=4, snn_timesteps="2,5x1") == [2, 2, 2, 5]
    assert unet_calls(pipe, steps=4, snn_timesteps="16x1,1,3x2") == [16, 1, 3, 3]
    assert unet_calls(pipe, steps=3, snn_timesteps=[1, 2, 3]) == [1, 2, 3]
    assert unet_calls(pipe, steps=3, snn_timesteps=TSchedule.parse("1,2x1")) == [1, 1, 2]
    assert unet_calls(pipe, steps=3, snn_timesteps=2) == [2, 2, 2]
    assert unet_calls(pipe, steps=3) == [None, None, None]  # the model's own T, as before
    plms = SpikingDiffusionPipeline(unet=snn, scheduler=make_scheduler("pndm", dict(DDIMScheduler().config)))
    assert unet_calls(plms, steps=3, snn_timesteps="2,5x1") == [2, 2, 2, 5]  # 4 calls, 3 noise levels


def test_a_constant_schedule_is_plain_t_bit_for_bit(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    plain = sample(pipe, snn_timesteps=2)
    for same in ([2, 2, 2], (2, 2, 2), "2", "2x3", "2,2x1", TSchedule.constant(2)):
        assert np.array_equal(sample(pipe, snn_timesteps=same), plain), same
    assert np.array_equal(sample(pipe, snn_timesteps=[4, 4, 4]), sample(pipe))  # the model's T = 4


def test_a_schedule_is_the_denoising_loop_with_each_steps_t(snn):
    """The pipeline's result is the scheduler loop written out with T changed between steps by hand."""
    latents = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scheduler = DDIMScheduler(clip_sample=False)
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(latents=latents, num_inference_steps=3, snn_timesteps="1,4x1", output_type="pt").images
    reference = DDIMScheduler(clip_sample=False)
    reference.set_timesteps(3)
    x = latents.clone()
    with torch.no_grad():
        for t, steps in zip(reference.timesteps, (1, 1, 4), strict=True):
            x = reference.step(snn(x, t, snn_timesteps=steps).sample, t, x).prev_sample
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    assert not torch.allclose(images, pipe(latents=latents, num_inference_steps=3, output_type="pt").images)


def test_per_image_generators_and_threshold_guidance_keep_working_under_a_schedule(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=make_scheduler("ddpm", dict(DDIMScheduler().config)))
    pipe.set_progress_bar_config(disable=True)

    def run(indices, **kwargs):
        gens = [torch.Generator().manual_seed(i) for i in indices]
        return pipe(batch_size=len(indices), generator=gens, num_inference_steps=3, output_type="np", **kwargs).images

    whole = run(range(4), snn_timesteps="2,4x1")
    split = np.concatenate([run(range(2), snn_timesteps="2,4x1"), run(range(2, 4), snn_timesteps="2,4x1")])
    np.testing.assert_allclose(split, whole, atol=1e-6)
    guided = run(range(2), snn_timesteps="2,4x1", threshold_scale=0.9)
    assert not np.array_equal(guided, whole[:2])
    assert np.array_equal(run(range(2), snn_timesteps="2,4x1"), whole[:2])  # the factors were restored


def test_a_schedule_that_does_not_fit_is_refused_before_any_unet_call(snn):
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    for bad, message in (
        ([4, 4], "gives T for 2 denoising steps, but there are 3"),
        ("8x2,16x2", "gives T for 4 denoising steps, but there are 3"),
        ("4,16x5", "take 5 denoising steps, more than the 3 there are"),
        ("4,8", "more than one bare T"),
        ("", "is empty"),
    ):
        with pytest.raises(ValueError, match="accepted: T for every step") as info:
            unet_calls(pipe, steps=3, snn_timesteps=bad)
        assert message in str(info.value)
    calls = []
    hook = snn.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError):
            sample(pipe, steps=3, snn_timesteps=[4, 4])
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("which", ["ann", "qcfs"])
def test_a_plain_unet_still_refuses_snn_timesteps(unet, which):
    model = unet if which == "ann" else quantize(unet, levels=4)
    pipe = SpikingDiffusionPipeline(unet=model, scheduler=DDIMScheduler())
    for value in (4, "4,16x1", [4, 4, 4]):
        with pytest.raises(ValueError, match="spiking UNets only"):
            sample(pipe, snn_timesteps=value)


def test_pndm_with_its_runge_kutta_warm_up_maps_every_call_onto_a_step():
    """PNDM with its Runge-Kutta warm-up evaluates the UNet many more times than it takes steps; each step keeps
    its T, in order."""
    scheduler = PNDMScheduler()
    scheduler.set_timesteps(4)
    steps = call_steps(scheduler.timesteps.tolist(), 4)
    assert steps[0] == 0 and steps[-1] == 3 and sorted(set(steps)) == [0, 1, 2, 3]


# -- sdm-sample ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny ANN pipeline and its spiking pipeline (T = 2, not calibrated), saved."""
    root = tmp_path_factory.mktemp("models")
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "ann")
    SpikingDiffusionPipeline(
        unet=convert(quantize(unet, levels=2), timesteps=2), scheduler=DDPMScheduler()
    ).save_pretrained(root / "snn")
    return {"ann": root / "ann", "snn": root / "snn"}


def run_sample(*args) -> object:
    return CliRunner().invoke(sample_main, [str(arg) for arg in (*args, "--steps", 3, "-n", 2, "--device", "cpu")])


def test_sdm_sample_takes_a_schedule_and_states_its_mean_t(saved, tmp_path):
    result = run_sample("--model", saved["snn"], "--snn-timesteps", "2,4x1", "--output", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "T = 2,4x1, mean T 2.66667 per denoising step" in result.output
    plain = run_sample("--model", saved["snn"], "--output", tmp_path / "b")
    assert "T = 2, mean T 2 per denoising step" in plain.output  # the model's own T
    same = run_sample("--model", saved["snn"], "-T", "2x3", "--output", tmp_path / "c")
    assert same.exit_code == 0 and "T = 2, mean T 2 per denoising step" in same.output
    for name in ("00000.png", "00001.png"):
        a, b, c = (np.asarray(Image.open(tmp_path / d / name)) for d in "abc")
        assert np.array_equal(b, c) and not np.array_equal(a, b)

    sweep_dir = tmp_path / "sweep"
    result = run_sample("--model", saved["snn"], "-T", "2,4x1", "--threshold-scale", "0.9,1", "--output", sweep_dir)
    assert result.exit_code == 0, result.output
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert sweep["snn_timesteps"] == "2,4x1" and sweep["mean_snn_timesteps"] == pytest.approx(8 / 3)


@pytest.mark.parametrize(
    ("model", "value", "message"),
    [
        ("snn", "4x2", "--spike-steps 4x2 gives T for 2 denoising steps, but there are 3"),
        ("snn", "4,16x4", "its TxK items take 4 denoising steps, more than the 3 there are"),
        ("snn", "2,", "the T schedule '2,' has an empty item"),
        ("snn", "2,4", "more than one bare T"),
        ("snn", "2,0x1", "T = 0 is out of range"),
        ("snn", "", "is empty"),
        ("snn", "0", "0 is not in the range 1<=x<=1024"),  # a plain T keeps its message
        ("ann", "2,4x1", "apply to spiking models"),
    ],
)
def test_sdm_sample_refuses_a_schedule_that_cannot_work(saved, tmp_path, model, value, message):
    result = run_sample("--model", saved[model], "--snn-timesteps", value, "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    if model == "snn" and value != "0":
        assert "accepted: T for every step" in errors[0]
    assert not (tmp_path / "out").exists()
